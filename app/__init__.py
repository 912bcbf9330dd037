"""Serving and the command line: `cli` (the `mllm` command), `engine` (ChatEngine), `ui` (Gradio), `api` (OpenAI HTTP).

Beside them: `scheduling` and `conversation` (the engine's locking / queue and per-conversation state),
`api_request` and `api_stream` (the API's request parsing / errors and its SSE or JSON replies).
"""
