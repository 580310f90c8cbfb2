"""Settings of the Sparkplug B host application (`bridge.sparkplug`)."""

from __future__ import annotations

from pydantic import Field, field_validator

from config.sections import Name, Section


class SparkplugSettings(Section):
    enabled: bool = Field(
        False,
        description="Run the Sparkplug B host application in the bridge: its own clean MQTT "
        "session on spBv1.0/ topics, entries on the route `sparkplug`.",
    )
    host_id: Name = Field(
        "iotbridge",
        description="Sparkplug Host ID: the STATE topic is spBv1.0/STATE/<host_id>; unique among "
        "every host application on the broker.",
    )
    groups: list[str] = Field(
        default_factory=lambda: ["#"],
        min_length=1,
        description="Sparkplug group ids to subscribe to (spBv1.0/<group>/#); # is every group.",
    )
    primary: bool = Field(
        True,
        description="This host sends rebirth requests (NCMD) on a sequence gap or an unknown "
        "alias; set false on every host but one sharing a broker, so a gap is one request.",
    )
    reorder_timeout_ms: int = Field(
        2000,
        ge=0,
        le=60_000,
        description="How long a message past a sequence gap is held for the missing one before "
        "the gap is given up and a rebirth requested.",
    )
    rebirth_min_interval_s: float = Field(
        10.0,
        gt=0,
        description="At most one rebirth request per edge node in this interval, however many "
        "gaps or unknown aliases it shows.",
    )

    @field_validator("groups")
    @classmethod
    def _group_ids(cls, groups: list[str]) -> list[str]:
        for group in groups:
            if group == "#":
                continue
            # tck-id-topic-structure-namespace-valid-group-id: any UTF-8 but + / #.
            if not group or any(char in group for char in "+/#"):
                raise ValueError(f"{group!r}: a group id is non-empty, without + / or #")
        return groups
