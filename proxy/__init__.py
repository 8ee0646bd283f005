"""The request path: an OpenAI-compatible FastAPI app that enforces a safe-testing template on
every request, relays the upstream's answer, detects refusals and records them.

`create_app(settings)` in `ptst.proxy.app` builds it; `ptst serve` runs it.
"""
