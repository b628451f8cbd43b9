"""The bot's slash commands and listeners: one cog (discord.py extension) per feature.

ChatBot (bot/chatbot.py) loads them by name, in the order of `bot.chatbot.COG_MODULES`. Read them in this
order:

1. `common`   — what the cogs share: the admin check, the audit row, `respond` (defer → answer → audit).
2. `chat`     — the message listener: hands each message to the conversation core and sends the reply.
3. `admin`    — /reload, /stats, /channel, /config, /reset.
4. `privacy`  — /privacy (server switches) and every user's /optin, /optout, /forget-me.
5. `feedback` — reactions on the bot's replies as +1 / -1.
6. `retrain`  — /retrain and the model versions.
"""
