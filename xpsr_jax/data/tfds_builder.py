"""TFDS builder `xpsr_pairs` (array_record) for LR/HR training pairs, built without TensorFlow.

Two builder configs, one per source layout:

* ``prepared``: the work folder written by ``python -m xpsr_jax.data.prepare``:
  ``HR/{id}.png``, ``LR/{id}.png`` (native LR size), ``degradation.jsonl`` and a captions
  JSONL (``captions.jsonl`` unless ``captions_path`` is given).
* ``official``: one or more folders in the layout of the official XPSR data scripts
  (qyp2000/XPSR ``utils_data/make_train.py`` and ``*_prompt_train.py``)::

      root/HR/<sub>/<name>.png     root/highlevel_prompt/<sub>/<name>.txt     (LR caption)
      root/LR/<sub>/<name>.png     root/highlevel_prompt_GT/<sub>/<name>.txt  (HR caption)
                                   root/lowlevel_prompt_q/<sub>/<name>.txt    (LR quality)
                                   root/lowlevel_prompt_q_GT/<sub>/<name>.txt (HR quality)

  (``<sub>`` may be absent or nested). make_train.py stores LR bicubic-upsampled to the HR
  size; it is stored as found. Degradation parameters are unknown and stored as NaN.

Build (one process)::

    build_dataset(config_name="prepared", source_dir="work", data_dir="tfds")

or with the builder directly (``XpsrPairs(config=..., data_dir=..., source_dir=...)``
then ``download_and_prepare()``). Read back with no TensorFlow installed::

    tfds.data_source("xpsr_pairs/prepared", data_dir="tfds")["train"][0]
    read_hr_target("tfds")    # "usm" | "original" | "unknown": what the HR images are

The dataset's ``metadata.json`` (``builder.info.metadata``) records ``hr_target``: ``usm``
(HR = the USM-sharpened crop, the official make_train.py default), ``original`` (the crop), or
``unknown`` (official layout: HR stored as found). Datasets built before it existed have no
``metadata.json``; ``read_hr_target`` says ``unknown`` for them.

Parallel builds (TFDS' Beam path needs Beam and TF, so it is not used): the sorted example
list is cut into ``num_parts`` contiguous parts, each part is an ordinary build of
``XpsrPairs(part_index=i, num_parts=n)`` into its own folder (in its own process, or on its own
machine sharing the file system), and ``merge_parts`` moves every part's array_record shards
into the final folder and writes one ``dataset_info.json`` listing all shards.
``build_dataset(..., num_parts=n, num_processes=p)`` does all of that on one machine.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import naming

from xpsr_jax.captions.io import load_captions
from xpsr_jax.data import images, official_layout
from xpsr_jax.data.degradation import DEGRADATION_PARAM_KEYS

DATASET_NAME = "xpsr_pairs"
SPLIT = "train"
PROMPT_FEATURES = (
    "highlevel_prompt_lr",
    "highlevel_prompt_hr",
    "lowlevel_prompt_lr",
    "lowlevel_prompt_hr",
)
# Prompt feature -> (source, task) key of xpsr_jax.captions.io.load_captions.
_CAPTION_KEYS = {
    "highlevel_prompt_lr": ("lr", "highlevel"),
    "highlevel_prompt_hr": ("hr", "highlevel"),
    "lowlevel_prompt_lr": ("lr", "lowlevel"),
    "lowlevel_prompt_hr": ("hr", "lowlevel"),
}
DEGRADATION_FILE = "degradation.jsonl"
CAPTIONS_FILE = "captions.jsonl"
PREPARE_SETTINGS_FILE = "prepare_settings.json"  # written by xpsr_jax.data.prepare's crop stage
HR_TARGETS = ("usm", "original")
UNKNOWN_HR_TARGET = "unknown"
_PARTS_DIR = ".xpsr_parts"


class DatasetSourceError(ValueError):
    """The source folders of a build are incomplete or inconsistent; the message says where."""


def degradation_param_keys() -> tuple[str, ...]:
    """The fixed key set of degradation parameters stored per example."""

    return tuple(DEGRADATION_PARAM_KEYS)


@dataclasses.dataclass(frozen=True)
class PairSource:
    """Where one example's data lives. `prompts` maps each of PROMPT_FEATURES to its text."""

    image_id: str
    hr_path: Path
    lr_path: Path
    source_file: str
    prompts: dict[str, str]
    degradation: dict[str, float]


# ----------------------------------------------------------------------------- scanning


def scan_prepared(work_dir: str | os.PathLike, captions_path: str | os.PathLike | None = None
                  ) -> list[PairSource]:
    """scan_prepared(work_dir, captions_path=None) -> examples sorted by image id.

    Every ``HR/{id}.png`` needs ``LR/{id}.png``, a ``degradation.jsonl`` record and the four
    prompts in the captions file; anything missing raises DatasetSourceError naming it.
    """

    work_dir = Path(work_dir)
    hr_dir, lr_dir = work_dir / "HR", work_dir / "LR"
    if not hr_dir.is_dir():
        raise DatasetSourceError(f"{hr_dir} does not exist: run the prepare 'crop' stage first")
    hr_paths = sorted(p for p in hr_dir.iterdir() if p.suffix == ".png")
    if not hr_paths:
        raise DatasetSourceError(f"{hr_dir} holds no .png files")
    captions_path = Path(captions_path) if captions_path else work_dir / CAPTIONS_FILE
    if not captions_path.is_file():
        raise DatasetSourceError(
            f"captions file {captions_path} does not exist: run the prepare 'caption' stage "
            "or pass a precomputed captions JSONL"
        )
    captions = load_captions(captions_path)
    degradations = read_degradation_records(work_dir / DEGRADATION_FILE)
    param_keys = degradation_param_keys()

    sources = []
    for hr_path in hr_paths:
        image_id = hr_path.stem
        lr_path = lr_dir / hr_path.name
        if not lr_path.is_file():
            raise DatasetSourceError(f"image {image_id!r}: {hr_path} has no LR image {lr_path}")
        record = degradations.get(image_id)
        if record is None:
            raise DatasetSourceError(
                f"image {image_id!r}: no record in {work_dir / DEGRADATION_FILE}"
            )
        prompts = {}
        for feature, (source, task) in _CAPTION_KEYS.items():
            text = captions.get((image_id, source, task))
            if text is None:
                raise DatasetSourceError(
                    f"image {image_id!r}: missing {task} prompt of the {source.upper()} image "
                    f"({feature}) in {captions_path}"
                )
            prompts[feature] = text
        params = record["params"]
        missing_keys = [k for k in param_keys if k not in params]
        if missing_keys:
            raise DatasetSourceError(
                f"image {image_id!r}: degradation record lacks parameter(s) {missing_keys} "
                f"in {work_dir / DEGRADATION_FILE}"
            )
        sources.append(PairSource(
            image_id=image_id,
            hr_path=hr_path,
            lr_path=lr_path,
            source_file=str(record.get("source_file", "")),
            prompts=prompts,
            degradation={k: float(params[k]) for k in param_keys},
        ))
    return sources


def read_degradation_records(path: str | os.PathLike) -> dict[str, dict]:
    """read_degradation_records(path) -> {image_id: record} of a degradation.jsonl.

    A partial last line (a killed writer) is ignored; a later record of the same id wins.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetSourceError(f"degradation file {path} does not exist")
    records = {}
    lines = path.read_bytes().split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number == len(lines):  # no trailing newline: the interrupted last write
                continue
            raise DatasetSourceError(f"{path}:{number}: not a JSON record") from None
        if "image_id" not in record or "params" not in record:
            raise DatasetSourceError(f"{path}:{number}: record needs 'image_id' and 'params'")
        records[record["image_id"]] = record
    return records


def prepared_hr_target(work_dir: str | os.PathLike) -> str:
    """The `hr_target` a prepare work folder was cropped with ("usm" / "original"), from its
    settings file; "original" for folders cropped before the setting existed, "unknown"
    without a settings file (a folder not written by prepare)."""
    path = Path(work_dir) / PREPARE_SETTINGS_FILE
    if not path.is_file():
        return UNKNOWN_HR_TARGET
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DatasetSourceError(f"{path}: not valid JSON ({error})") from None
    value = settings.get("hr_target", "original")
    if value not in HR_TARGETS:
        raise DatasetSourceError(f"{path}: hr_target={value!r}; valid are {', '.join(HR_TARGETS)}")
    return value


def scan_official(roots: str | os.PathLike | Sequence[str | os.PathLike], part_index: int = 0,
                  num_parts: int = 1) -> list[PairSource]:
    """scan_official(root or roots, part_index=0, num_parts=1) -> examples sorted by image id
    ``{root name}/{sub}/{name}``; only part `part_index` of `num_parts` has its files read.

    Prompt folders and text as `xpsr_jax.data.official_layout` reads them (the file's first
    line with leading spaces removed, as the official loader dataloader/localdataset.py; an
    empty file gives ""). A missing prompt file raises DatasetSourceError naming the image and
    the prompt kind.
    """
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    located = {}  # image id -> (root, path relative to root/HR)
    for root in map(Path, roots):
        hr_dir = root / official_layout.HR_FOLDER
        if not hr_dir.is_dir():
            raise DatasetSourceError(
                f"{root} is not in the official XPSR layout: {hr_dir} does not exist "
                f"(expected HR/, LR/, highlevel_prompt[_GT]/, lowlevel_prompt_q[_GT]/)"
            )
        for hr_path in hr_dir.rglob("*.png"):
            relative = hr_path.relative_to(hr_dir)
            image_id = f"{root.name}/{relative.with_suffix('').as_posix()}"
            if image_id in located:
                raise DatasetSourceError(
                    f"image id {image_id!r} occurs twice: give roots with distinct folder names"
                )
            located[image_id] = (root, relative)
    if not located:
        raise DatasetSourceError(f"no HR/**/*.png found under {[str(r) for r in roots]}")
    nan_params = {k: math.nan for k in degradation_param_keys()}
    folders = {root: _official_prompt_folders(root) for root, _ in located.values()}
    return [_official_source(image_id, root, relative, folders[root], nan_params)
            for image_id in part_of(sorted(located), part_index, num_parts)
            for root, relative in [located[image_id]]]


def _official_prompt_folders(root: Path) -> dict[str, str | None]:
    """Prompt feature -> its folder under `root` (None: no such folder), by the layout's one rule."""
    try:
        return {feature: official_layout.prompt_folder(root, kind, of_hr=source == "hr")
                for feature, (source, kind) in _CAPTION_KEYS.items()}
    except ValueError as error:
        raise DatasetSourceError(str(error)) from None


def _official_source(image_id: str, root: Path, relative: Path, folders: dict[str, str | None],
                     nan_params: dict) -> PairSource:
    hr_path = root / official_layout.HR_FOLDER / relative
    lr_path = root / official_layout.LR_FOLDER / relative
    if not lr_path.is_file():
        raise DatasetSourceError(f"image {image_id!r}: {hr_path} has no LR image {lr_path}")
    prompts = {}
    for feature, folder in folders.items():
        if folder is None:
            raise DatasetSourceError(f"image {image_id!r}: missing {feature} prompt: {root} has no "
                                     f"{official_layout.LOWLEVEL_PREFIX}*/ folder for it")
        prompt_path = official_layout.prompt_path(root, folder, relative)
        if not prompt_path.is_file():
            raise DatasetSourceError(
                f"image {image_id!r}: missing {feature} prompt file {prompt_path}"
            )
        prompts[feature] = official_layout.read_prompt(prompt_path)
    return PairSource(image_id=image_id, hr_path=hr_path, lr_path=lr_path,
                      source_file=str(hr_path), prompts=prompts, degradation=dict(nan_params))


def part_of(items: Sequence, part_index: int, num_parts: int) -> list:
    """The `part_index`-th of `num_parts` contiguous, near-equal slices of `items`."""
    if num_parts < 1 or not 0 <= part_index < num_parts:
        raise ValueError(
            f"part_index {part_index} / num_parts {num_parts}: need 0 <= part_index < num_parts")
    bounds = np.linspace(0, len(items), num_parts + 1).round().astype(int)
    return list(items[bounds[part_index]:bounds[part_index + 1]])


# ----------------------------------------------------------------------------- the builder

_PREPARED_DESCRIPTION = """\
XPSR LR/HR training pairs made by `python -m xpsr_jax.data.prepare`: HR crops, LR from the
Real-ESRGAN second-order degradation at x4 (native LR size), the degradation parameters
drawn for each example, and MLLM prompts (high-level content / low-level quality) of both
the LR and the HR image. Images are lossless 8-bit RGB PNG. metadata.json `hr_target`: `usm`
when the HR images are the USM-sharpened crops (the official make_train.py), `original` when
they are the crops themselves."""

_OFFICIAL_DESCRIPTION = """\
XPSR LR/HR training pairs converted from the official XPSR folder layout (HR/, LR/,
highlevel_prompt[_GT]/, lowlevel_prompt_q[_GT]/). LR images are stored as found; the
official make_train.py saves them bicubic-upsampled to the HR size. The degradation
parameters are unknown for such data: every `degradation` value is NaN."""


class XpsrPairs(tfds.core.GeneratorBasedBuilder):
    """XpsrPairs(config="prepared"|"official", data_dir=..., source_dir=..., captions_path=None,
    part_index=0, num_parts=1, **tfds_builder_kwargs).

    `source_dir` is the prepare work folder ("prepared") or one official root / a list of
    them ("official"); only needed to build, not to read.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    # tfds derives this through importlib_resources, which is not a dependency here (tfds
    # 4.9.10 then fails with ModuleNotFoundError); the answer is simply this file.
    code_path = epath.Path(__file__)
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="prepared", description="from `xpsr_jax.data.prepare`"),
        tfds.core.BuilderConfig(name="official", description="from the official XPSR layout"),
    ]

    def __init__(self, *, source_dir=None, captions_path=None, part_index: int = 0,
                 num_parts: int = 1, hr_target: str | None = None, **kwargs):
        self._source_dir = source_dir
        self._captions_path = captions_path
        self._part_index = part_index
        self._num_parts = num_parts
        self._hr_target = hr_target  # default: from the source (see _metadata)
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    # tfds prints "Downloading and preparing dataset ..." and "... downloaded and prepared" to
    # stdout; nothing is downloaded here, so say what happens instead.
    def _log_download_bytes(self) -> None:
        part = f" (part {self._part_index + 1} of {self._num_parts})" if self._num_parts > 1 else ""
        print(f"building dataset {self.name}/{self.builder_config.name}{part} from local files into "
              f"{self.data_dir}", flush=True)

    def _log_download_done(self) -> None:
        print(f"dataset {self.name}/{self.builder_config.name} written to {self.data_dir}", flush=True)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: dataset_info_from_configs would read metadata files from
        # this package's folder, which holds none.
        png = dict(shape=(None, None, 3), dtype=np.uint8, encoding_format="png")
        features = {
            "image_id": tfds.features.Text(),
            "source_file": tfds.features.Text(),
            # Encoded PNG bytes are passed in (tfds only needs TF to encode numpy arrays);
            # reading decodes with OpenCV.
            "hr": tfds.features.Image(**png),
            "lr": tfds.features.Image(**png),
            **{name: tfds.features.Text() for name in PROMPT_FEATURES},
            "degradation": tfds.features.FeaturesDict(
                {k: tfds.features.Scalar(dtype=np.float32) for k in degradation_param_keys()}
            ),
        }
        description = (_OFFICIAL_DESCRIPTION if self.builder_config.name == "official"
                       else _PREPARED_DESCRIPTION)
        return tfds.core.DatasetInfo(
            builder=self,
            description=description,
            features=tfds.features.FeaturesDict(features),
            homepage="https://github.com/qyp2000/XPSR",
            metadata=self._metadata(),
        )

    def _metadata(self) -> tfds.core.MetadataDict | None:
        """{"hr_target": ...} when building; None when reading (tfds then loads metadata.json,
        whereas a dict given here would override the stored values)."""
        hr_target = self._hr_target
        if hr_target is None and self._source_dir is not None:
            hr_target = (UNKNOWN_HR_TARGET if self.builder_config.name == "official"
                         else prepared_hr_target(self._source_dir))
        if hr_target is None:
            return None
        if hr_target not in (*HR_TARGETS, UNKNOWN_HR_TARGET):
            raise ValueError(f"hr_target={hr_target!r}: valid are "
                             f"{', '.join((*HR_TARGETS, UNKNOWN_HR_TARGET))}")
        return tfds.core.MetadataDict(hr_target=hr_target)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        if self._source_dir is None:
            raise DatasetSourceError(
                f"building {self.name}/{self.builder_config.name} needs source_dir= (the prepare "
                "work folder, or official XPSR root folder(s))"
            )
        if self.builder_config.name == "official":
            sources = scan_official(self._source_dir, self._part_index, self._num_parts)
        else:
            # One captions JSONL to parse anyway; checking every example costs little.
            sources = part_of(scan_prepared(self._source_dir, self._captions_path),
                              self._part_index, self._num_parts)
        return {SPLIT: self._generate_examples(sources)}

    def _generate_examples(self, sources: Sequence[PairSource]) -> Iterator[tuple[str, dict]]:
        for source in sources:
            yield source.image_id, example_of(source)


def example_of(source: PairSource) -> dict:
    """The feature dict of one example (PNG bytes for the images)."""
    return {
        "image_id": source.image_id,
        "source_file": source.source_file,
        "hr": images.rgb_png_bytes_of_file(source.hr_path),
        "lr": images.rgb_png_bytes_of_file(source.lr_path),
        **source.prompts,
        "degradation": {k: np.float32(v) for k, v in source.degradation.items()},
    }


# ----------------------------------------------------------------------------- building


def _download_config(shards_per_part: int | None) -> tfds.download.DownloadConfig:
    # try_download_gcs=False: never look for a prebuilt copy online.
    return tfds.download.DownloadConfig(try_download_gcs=False, num_shards=shards_per_part)


def dataset_dir(data_dir: str | os.PathLike, config_name: str) -> Path:
    """Folder of a built dataset: `data_dir/xpsr_pairs/<config>/<version>`."""
    return Path(data_dir) / DATASET_NAME / config_name / str(XpsrPairs.VERSION)


def is_built(data_dir: str | os.PathLike, config_name: str) -> bool:
    """True when `dataset_info.json` of the dataset exists (a finished build or merge)."""
    return (dataset_dir(data_dir, config_name) / "dataset_info.json").is_file()


def part_data_dir(data_dir: str | os.PathLike, config_name: str, part_index: int,
                  num_parts: int) -> Path:
    """The data_dir that part `part_index` of `num_parts` is built into."""
    return Path(data_dir) / _PARTS_DIR / config_name / f"part-{part_index:05d}-of-{num_parts:05d}"


def build_part(*, config_name: str, source_dir, data_dir: str | os.PathLike, part_index: int,
               num_parts: int, captions_path=None, shards_per_part: int | None = None) -> Path:
    """build_part(...) -> folder of part `part_index`; skipped when that part is complete.

    Run one call per process/machine (same `num_parts` everywhere), then `merge_parts`.
    """
    builder = XpsrPairs(
        config=config_name,
        data_dir=os.fspath(part_data_dir(data_dir, config_name, part_index, num_parts)),
        source_dir=source_dir,
        captions_path=captions_path,
        part_index=part_index,
        num_parts=num_parts,
    )
    builder.download_and_prepare(download_config=_download_config(shards_per_part))
    return Path(builder.data_dir)


def merge_parts(*, config_name: str, data_dir: str | os.PathLike, num_parts: int) -> Path:
    """merge_parts(config_name=, data_dir=, num_parts=) -> final dataset folder.

    Moves the shards of every part into `dataset_dir(data_dir, config_name)`, renamed to one
    global `-{i}-of-{n}` sequence, and writes the metadata listing them. The final folder
    appears by one rename, so it is either complete or absent.
    """
    final_dir = dataset_dir(data_dir, config_name)
    if is_built(data_dir, config_name):
        return final_dir
    part_builders, part_hr_targets = [], set()
    for index in range(num_parts):
        part_dir = dataset_dir(part_data_dir(data_dir, config_name, index, num_parts), config_name)
        if not (part_dir / "dataset_info.json").is_file():
            raise DatasetSourceError(
                f"part {index} of {num_parts} is not built ({part_dir} has no dataset_info.json); "
                "build every part before merging"
            )
        part_builders.append(tfds.builder_from_directory(os.fspath(part_dir)))
        part_hr_targets.add(_stored_hr_target(part_dir))
    if len(part_hr_targets) > 1:
        raise DatasetSourceError(f"the parts of {final_dir} were built from work folders with "
                                 f"different hr_target settings: {sorted(part_hr_targets)}")

    shard_files, shard_lengths = [], []
    for builder in part_builders:
        split = builder.info.splits[SPLIT]
        shard_files += [Path(os.fspath(f)) for f in split.filepaths]
        shard_lengths += list(split.shard_lengths)

    staging_dir = final_dir.with_name(final_dir.name + ".merging")
    shutil.rmtree(staging_dir, ignore_errors=True)
    staging_dir.mkdir(parents=True)
    template = naming.ShardedFileTemplate(
        data_dir=staging_dir, dataset_name=DATASET_NAME, split=SPLIT, filetype_suffix="array_record"
    )
    num_bytes = 0
    for shard_index, shard_file in enumerate(shard_files):
        target = template.sharded_filepath(shard_index=shard_index, num_shards=len(shard_files))
        num_bytes += shard_file.stat().st_size
        _link_or_copy(shard_file, Path(os.fspath(target)))

    info = XpsrPairs(config=config_name, data_dir=os.fspath(data_dir),
                     hr_target=part_hr_targets.pop()).info
    split_info = tfds.core.SplitInfo(
        name=SPLIT, shard_lengths=shard_lengths, num_bytes=num_bytes,
        filename_template=template.replace(data_dir=final_dir),
    )
    info.set_splits(tfds.core.SplitDict([split_info]))
    info.set_file_format("array_record")
    info.write_to_directory(staging_dir)
    os.replace(staging_dir, final_dir)
    shutil.rmtree(Path(data_dir) / _PARTS_DIR / config_name, ignore_errors=True)
    try:
        (Path(data_dir) / _PARTS_DIR).rmdir()  # only when no other config's parts are left
    except OSError:
        pass
    return final_dir


def _link_or_copy(source: Path, target: Path) -> None:
    # A hard link keeps the part valid until the merge is done (a killed merge can rerun).
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def build_dataset(*, config_name: str, source_dir, data_dir: str | os.PathLike,
                  captions_path=None, num_parts: int = 1, num_processes: int = 1,
                  shards_per_part: int | None = None) -> Path:
    """build_dataset(config_name=, source_dir=, data_dir=, captions_path=None, num_parts=1,
    num_processes=1, shards_per_part=None) -> dataset folder. A finished dataset is kept.

    With `num_parts` > 1 the parts are built by `num_processes` processes (parts already
    built, e.g. on other machines, are reused) and merged.
    """
    if config_name not in ("prepared", "official"):
        raise ValueError(f"config_name {config_name!r}: valid are 'prepared', 'official'")
    if num_parts < 1 or num_processes < 1:
        raise ValueError(f"num_parts={num_parts}, num_processes={num_processes}: need >= 1")
    if is_built(data_dir, config_name):
        return dataset_dir(data_dir, config_name)
    if num_parts == 1:
        builder = XpsrPairs(config=config_name, data_dir=os.fspath(data_dir),
                            source_dir=source_dir, captions_path=captions_path)
        builder.download_and_prepare(download_config=_download_config(shards_per_part))
        return Path(builder.data_dir)
    part_kwargs = [dict(config_name=config_name, source_dir=source_dir, data_dir=data_dir,
                        part_index=index, num_parts=num_parts, captions_path=captions_path,
                        shards_per_part=shards_per_part) for index in range(num_parts)]
    if num_processes == 1:
        for kwargs in part_kwargs:
            build_part(**kwargs)
    else:
        # spawn, not fork: the caller may hold threads (JAX, grain) that fork copies broken.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(num_processes, num_parts),
                                                    mp_context=context) as pool:
            for future in [pool.submit(build_part, **kwargs) for kwargs in part_kwargs]:
                future.result()
    return merge_parts(config_name=config_name, data_dir=data_dir, num_parts=num_parts)


# ----------------------------------------------------------------------------- reading


def _stored_hr_target(version_dir: Path) -> str:
    path = version_dir / "metadata.json"
    if not path.is_file():
        return UNKNOWN_HR_TARGET
    try:
        value = json.loads(path.read_text()).get("hr_target", UNKNOWN_HR_TARGET)
    except (json.JSONDecodeError, AttributeError):
        raise DatasetSourceError(f"{path}: not a JSON object") from None
    return value if value in HR_TARGETS else UNKNOWN_HR_TARGET


def read_hr_target(data_dir: str | os.PathLike, dataset: str = f"{DATASET_NAME}/prepared") -> str:
    """read_hr_target(data_dir, dataset="xpsr_pairs/prepared") -> "usm" | "original" | "unknown".

    What the dataset's HR images are: "usm" (USM-sharpened crops, as the official data script
    saves them), "original" (unsharpened crops), or "unknown" (the official layout, or a
    dataset built before this was recorded). `dataset` is "name/config[:version]" as for
    `tfds.data_source`. Raises DatasetSourceError when the dataset is not built there.
    """
    name_config, _, version = dataset.partition(":")
    version_dir = Path(data_dir) / name_config / (version or str(XpsrPairs.VERSION))
    if not (version_dir / "dataset_info.json").is_file():
        raise DatasetSourceError(f"dataset {dataset!r} is not built in {data_dir} "
                                 f"({version_dir / 'dataset_info.json'} does not exist)")
    return _stored_hr_target(version_dir)
