"""Ray Serve endpoints (``beit_ray.serve.app.build_app``); nothing happens at import time."""
