"""`moeinf serve`: an OpenAI-style HTTP server over one LLM."""
