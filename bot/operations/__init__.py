"""What an operator runs the bot with: a start-up that fails fast, a health check, Prometheus metrics.

Reading order: `startup` (the token, the intent and the gateway checked while the model loads; exit codes),
`health` (the heartbeat file the bot refreshes while it is healthy, and `chatbot health`), `metrics` (the
counters, histograms and scrape-time gauges on a per-bot registry) and `sidecar` (the heartbeat and the
metrics endpoint running beside the bot).
"""
