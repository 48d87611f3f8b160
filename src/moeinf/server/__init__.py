"""`moeinf serve`: an Ollama- and OpenAI-compatible HTTP API over the same generation events as `run`.

app.py builds the FastAPI app; ollama_routes.py and openai_routes.py are the two APIs; generation.py is
a request as a worker job; queue.py runs jobs one at a time; manager.py holds the one loaded model;
options.py maps request fields onto moeinf's parameters; transport.py is the shared HTTP plumbing.
FastAPI and uvicorn are the optional `serve` extra: nothing outside this package imports them.
"""
