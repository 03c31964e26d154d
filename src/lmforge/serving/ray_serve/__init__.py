"""The Ray Serve platform of the deploy stage (``serving.platform: ray``): replicas of our server, autoscaling,
rolling updates when the served version changes.

``app.py`` deploys, rolls and removes the Serve application (the driver's side); ``replica.py`` is what each
replica runs: the engine and the OpenAI-compatible app of ``lmforge serve``, unchanged.
"""

from lmforge.serving.ray_serve.app import RayApp, deploy_app, read_app, stop_app

__all__ = ["RayApp", "deploy_app", "read_app", "stop_app"]
