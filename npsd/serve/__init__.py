"""`npsd serve`: AUTOMATIC1111's HTTP API (/sdapi/v1/...) and a page, on npsd's pipelines.

- npsd/serve/a1111.py: A1111's request fields -> npsd's settings (the command line's, npsd/cli.py),
  and the responses back (base64 PNGs carrying their "parameters" text, npsd/pngmeta.py; the "info"
  JSON); which fields npsd honours, which change nothing, which it refuses;
- npsd/serve/app.py: `create_app(ServeSettings(...))` -> a FastAPI app: one worker thread runs one
  job at a time from a first-in first-out queue; the model stays loaded and is switched by the
  `sd_model_checkpoint` option; `run_serve(args)` is the command line's `npsd serve`;
- npsd/serve/static/: the page (plain HTML, CSS and JavaScript; no build step).

Importing this package imports nothing heavy: FastAPI and uvicorn (the "serve" extra) are needed only
by npsd/serve/app.py.
"""
