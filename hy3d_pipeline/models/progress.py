"""Per-image progress of a batch step: one log line per image and stage, such as

    progress: image 3 of 8 (26%), generating: samples/mug.png

A person reads them in the run's logs; `hy3d_pipeline.client.result()` parses them (over the same GraphQL API as
everything else) into `progress` and `current`. A plain log line rather than a custom event because the run's log
view shows it as it is, with no UI of our own. Standard library only: the client imports `parse`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# the share of one image's work done when it enters each stage: fetching is quick, generation is most of it
STAGES = {"downloading": 0.0, "generating": 0.1, "done": 1.0, "failed": 1.0}
_LINE = re.compile(r"progress: image (\d+) of (\d+) \((\d+)%\), (\w+): (.*)\Z", re.S)


@dataclass(frozen=True)
class Progress:
    index: int  # 1-based position of the image in the run's partitions
    count: int
    stage: str
    image: str  # the partition key

    @property
    def percent(self) -> float:
        """The run's share done, 0-100: the images before this one, plus this one's share at its stage."""
        done = self.index - 1 + STAGES.get(self.stage, 0.0)
        return round(100.0 * min(max(done / max(self.count, 1), 0.0), 1.0), 1)

    def line(self) -> str:
        return f"progress: image {self.index} of {self.count} ({int(self.percent)}%), {self.stage}: {self.image}"


def parse(message: str) -> Progress | None:
    """The progress a log message reports, or None for any other message."""
    match = _LINE.match(message or "")
    if not match or match.group(4) not in STAGES:
        return None
    return Progress(int(match.group(1)), int(match.group(2)), match.group(4), match.group(5))


def report(log, index: int, count: int, image: str, stage: str) -> None:
    """Log that image `index` of `count` (partition key `image`) enters `stage` (a key of STAGES)."""
    if stage not in STAGES:
        raise ValueError(f"unknown progress stage {stage!r}; use one of {', '.join(STAGES)}")
    log.info(Progress(index, count, stage, image).line())
