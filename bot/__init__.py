"""Discord front end, storage and command line of the GPT-2 chatbot."""
