"""The web demo: `python -m xpsr_jax.demo` (Gradio, the optional `[demo]` extra).

`service` holds the work (upload checks, recipes, captions, super-resolution) and imports no
Gradio; `app` is the page over it; `cli` the command.
"""
