"""Talk to a trained model: the batching engine (:mod:`llava.serve.engine`), an OpenAI-compatible HTTP server
with a chat page (:mod:`llava.serve.api`) and an interactive terminal chat (:mod:`llava.serve.cli`)."""
