"""Schedules of the distillation weight and temperature over training updates."""

from dataclasses import dataclass

CONSTANT = "constant"


@dataclass(frozen=True)
class LinearSchedule:
    """``start`` until update ``first``, then linear to ``end`` at update ``last``.

    A constant schedule has ``start == end``. With ``first == last`` the value
    jumps from ``start`` to ``end`` at that update.

    Args:
        start: value at updates ``<= first``.
        end: value at updates ``>= last``.
        first: update number where the ramp begins.
        last: update number where the ramp ends (``>= first``).
    """

    start: float
    end: float
    first: int = 0
    last: int = 0

    def __call__(self, num_updates):
        """The value for a step taken after ``num_updates`` completed updates."""
        if num_updates >= self.last:
            return self.end
        if num_updates <= self.first:
            return self.start
        frac = (num_updates - self.first) / (self.last - self.first)
        return self.start + (self.end - self.start) * frac

    @property
    def is_constant(self):
        """Whether the value never changes."""
        return self.start == self.end

    @property
    def values(self):
        """The two extreme values (every value lies between them)."""
        return (self.start, self.end)


def parse_schedule(spec, constant, option):
    """Parse ``constant`` or ``linear:START:END:FROM:TO`` into a schedule.

    Args:
        spec: the option's value.
        constant: the value of a ``constant`` schedule (the plain option,
            e.g. ``--kd-alpha``).
        option: the option's name, for error messages.

    Returns:
        A :class:`LinearSchedule`.
    """
    spec = (spec or CONSTANT).strip()
    if spec == CONSTANT:
        return LinearSchedule(constant, constant)
    parts = spec.split(":")
    if parts[0] != "linear" or len(parts) != 5:
        raise ValueError(
            f"{option} must be 'constant' or 'linear:START:END:FROM:TO' "
            f"(e.g. linear:0.9:0.1:0:4000), got {spec!r}"
        )
    try:
        start, end = float(parts[1]), float(parts[2])
        first, last = int(parts[3]), int(parts[4])
    except ValueError:
        raise ValueError(
            f"{option} {spec!r}: START and END must be numbers and FROM and TO "
            "whole update numbers"
        ) from None
    if first < 0:
        raise ValueError(f"{option} {spec!r}: FROM must be >= 0, got {first}")
    if last < first:
        raise ValueError(
            f"{option} {spec!r}: the schedule ends (TO = {last}) before it "
            f"starts (FROM = {first})"
        )
    return LinearSchedule(start, end, first, last)
