"""Defaults of the caption command, following the official XPSR data scripts.

``get_config() -> ConfigDict`` returns a locked config (a mistyped key is an
error). ``question_for(config) -> str`` resolves the question to ask.
"""

from __future__ import annotations

from ml_collections import config_dict

# The name users know; at run time ``--model`` must be a local folder.
DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"

# The two questions of qyp2000/XPSR utils_data/{highlevel,lowlevel}_prompt_train.py.
QUESTIONS = {
    "highlevel": "Please provide a descriptive summary of the content of this image.",
    "lowlevel": "Describe and evaluate the quality of the image.",
}
TASKS = tuple(QUESTIONS)
# The paper's "simple description" setting (supplement Table 3): a short answer naming objects or
# distortions, at most SIMPLE_WORD_LIMIT words (enforced on the answer, not only asked for).
SIMPLE_WORD_LIMIT = 20
SIMPLE_QUESTIONS = {
    "highlevel": f"Name the main objects in this image in at most {SIMPLE_WORD_LIMIT} words.",
    "lowlevel": f"Name the distortions of this image in at most {SIMPLE_WORD_LIMIT} words.",
}
QUESTION_PRESETS = ("official", "simple")
DTYPES = ("auto", "bf16", "fp16", "fp32")


def get_config() -> config_dict.ConfigDict:
    """Default settings of ``python -m xpsr_jax.captions`` (locked ConfigDict)."""
    config = config_dict.ConfigDict()
    config.model = DEFAULT_MODEL
    config.task = "highlevel"
    config.question = config_dict.placeholder(str)  # None: the task's question of question_preset
    config.question_preset = "official"  # "simple": SIMPLE_QUESTIONS, answers cut to 20 words
    # What the model sees, e.g. "downscale:64,upscale:256" (xpsr_jax.captions.transforms); "" = the image.
    config.caption_transform = ""
    # Jinja-free fallback for processors without a chat template, e.g.
    # "USER: <image>\n{question} ASSISTANT:"; None: processor.apply_chat_template.
    config.prompt_template = config_dict.placeholder(str)
    config.lr_dir = config_dict.placeholder(str)
    config.hr_dir = config_dict.placeholder(str)
    config.output = "captions.jsonl"
    config.max_new_tokens = 200
    config.do_sample = False
    config.temperature = 1.0
    config.top_p = 1.0
    config.seed = 0
    config.batch_size = 8
    config.dtype = "auto"
    config.device = config_dict.placeholder(str)  # None: cuda if available, else cpu
    config.shard = 0
    config.num_shards = 1
    config.max_images = config_dict.placeholder(int)  # None: all; else stop after this many
    config.lock()
    return config


def question_for(config: config_dict.ConfigDict) -> str:
    """The explicit ``config.question``, else ``config.task``'s question of ``config.question_preset``."""
    if config.question:
        return config.question
    return preset_question(config.question_preset, config.task)


def preset_question(preset: str, task: str) -> str:
    return (SIMPLE_QUESTIONS if preset == "simple" else QUESTIONS)[task]


def limit_words(text: str, limit: int) -> str:
    """`text` cut after its first `limit` whitespace-separated words."""
    words = text.split()
    return text if len(words) <= limit else " ".join(words[:limit])
