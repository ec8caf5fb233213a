"""`tunelab serve`: an OpenAI-compatible fine-tuning service (see docs/service.md).

db (SQLite state) · keys (API keys) · files (uploads, checked by the CLI's readers) · jobs (job records, events,
claiming and reaping) · worker (runs jobs as `tunelab train` child processes) · inference (chat and classifier
calls) · app (the HTTP routes and the dashboard) · server (uvicorn plus supervised workers).
The API side never imports the training loop (tunelab.loop) or tunelab.pipeline: training happens only in
workers' children.
"""
