"""Base of the frozen model configs that are read from / written to `config.json`."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, ClassVar


def _freeze(value: Any) -> Any:
    """JSON lists become tuples so configs stay hashable (NNX keeps them as static metadata)."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Fields are the config.json keys the model uses, with the reference defaults.

    `fixed_keys` lists keys of the upstream format that this implementation supports only at
    one value: any other value is an error (never a silent architecture change). Other unknown
    keys warn. `raw` keeps the file's dict so `save_pretrained` writes back what was read.
    """

    fixed_keys: ClassVar[dict[str, Any]] = {}
    class_name: ClassVar[str] = ""
    raw: dict | None = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "config") -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        known, unknown = {}, []
        for key, value in raw.items():
            if key.startswith("_"):
                continue
            if key in names:
                known[key] = _freeze(value)
            elif key in cls.fixed_keys:
                if _freeze(value) != _freeze(cls.fixed_keys[key]):
                    raise ValueError(
                        f"{source}: {key}={value!r} is not supported; this implementation builds only "
                        f"{key}={cls.fixed_keys[key]!r}"
                    )
            else:
                unknown.append(key)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown config keys {sorted(unknown)}", stacklevel=2)
        config = cls(**known, raw=dict(raw))
        config.validate(source)
        return config

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        return cls.from_dict(raw, source=str(path))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = dict(self.raw or {})
        if self.class_name:
            out.setdefault("_class_name", self.class_name)
        for field in dataclasses.fields(self):
            if field.name != "raw":
                out[field.name] = _thaw(getattr(self, field.name))
        return out

    def validate(self, source: str) -> None:
        """Subclasses check value ranges here; messages name `source` and the key."""
