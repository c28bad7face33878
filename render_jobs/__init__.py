"""Render jobs: import, sanitize and normalize assets, and render the NeAR recipes with EEVEE.

Only `render_jobs.blender_scene` (and the worker that imports it) needs bpy; every other module here is
plain numpy and runs in both environments, so the supervisor can live in the main env (and a Ray actor).
"""

__all__: list[str] = []
