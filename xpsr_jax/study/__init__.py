"""The paper's blind user study as a tool: `python -m xpsr_jax.study serve|report`.

`catalog` (the LR and method folders), `store` (votes in SQLite) and `report` (supplement Table 1
with Wilson intervals) import no Gradio; `app` is the voting page (the optional `[demo]` extra).
"""
