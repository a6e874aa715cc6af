"""sd3serve REST API (FastAPI). Importing it never imports torch."""
