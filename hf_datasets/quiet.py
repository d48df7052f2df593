"""Third-party log lines that never concern a chexmem user, dropped where chexmem imports the
library (`detect`, `mitigate` and `train` call `quiet_third_party` first), one message each."""

from __future__ import annotations

import logging

# transformers 5 warns, on the first import of diffusers' pipelines, that CLIP's and SigLIP's
# image processors fall back to PIL without torchvision; chexmem never uses an image processor
DROPPED = {
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back",),
}


class DropMessages(logging.Filter):
    """Drops records whose message contains one of the given fragments."""

    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_third_party() -> None:
    """Install the filters (once) on the loggers that emit the dropped messages."""
    for name, fragments in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(fragments))
