"""`iumad serve`: the production model behind HTTP (FastAPI + uvicorn), hot-swapped on promotion.

Layers: `errors` (the JSON error shape), `uploads` (multipart files -> validated sample records in a
temporary folder), `holder` (the loaded model and its background swap), `metrics` (Prometheus), `app`
(routes). Nothing below iumad/serve imports it.
"""
