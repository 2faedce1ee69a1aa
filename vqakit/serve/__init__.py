"""Serving: a REST service (FastAPI) and a web UI (Gradio) over the one ``VQAPredictor``.

    vqakit serve --checkpoint runs/easy-vqa/checkpoint --host 127.0.0.1 --port 8000   # /predict, /docs, /ui
    vqakit demo  --checkpoint runs/easy-vqa/checkpoint                                  # the web UI

``config.py`` holds the settings (batching and every security limit), ``batching.py`` groups concurrent
requests into one forward pass, ``sources.py`` reads images from the request (base64, a path under a
configured root, an allow-listed URL) under those limits, ``app.py`` is the FastAPI application, ``openai_api.py``
its OpenAI-compatible ``/v1`` routes and ``ui.py`` the Gradio page mounted at ``/ui``. Nothing here imports ``vqakit.train``.
"""
