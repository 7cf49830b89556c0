"""What every spec shares: the pydantic base (unknown keys, infinities, NaN and yes/no-for-a-number are errors) and
the field types more than one spec module uses. Imports neither torch nor any plugin, nor another spec module."""

from __future__ import annotations

import typing
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

DeviceName = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N")]


def _accepts_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    return any(_accepts_bool(a) for a in typing.get_args(annotation))


class _Spec(BaseModel):
    """Every spec: unknown keys, infinities and NaN are errors, and true/false is not a number."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key) if isinstance(key, str) else None
                if isinstance(value, bool) and field is not None and not _accepts_bool(field.annotation):
                    raise ValueError(f"{key}: {str(value).lower()} is a yes/no value; give a number or a name")
        return data
