"""The query side's models: the image and text encoders, each loaded on first use, once per worker.

Thread-safe; both are injectable (tests pass ready encoders). Loading fails with ``NotReady`` when
a model has not been exported (``make models``).
"""

from __future__ import annotations

import threading

from shared.encoder import ImageEncoder
from shared.errors import VersionMismatch
from shared.manifests import IndexManifest
from shared.settings import Settings
from shared.text_encoder import TextEncoder


class Models:
    """Lazily loaded encoders for one worker process."""

    def __init__(self, settings: Settings, image: ImageEncoder | None = None, text: TextEncoder | None = None):
        self.settings = settings
        self._image = image
        self._text = text
        self._lock = threading.Lock()

    def image(self) -> ImageEncoder:
        """The image encoder.

        Raises:
            NotReady: the model has not been built.
        """
        if self._image is None:
            with self._lock:
                if self._image is None:
                    self._image = ImageEncoder.from_settings(self.settings)
        return self._image

    def text(self) -> TextEncoder:
        """The text encoder.

        Raises:
            NotReady: the model has not been built.
        """
        if self._text is None:
            with self._lock:
                if self._text is None:
                    self._text = TextEncoder.from_settings(self.settings)
        return self._text

    def check_index(self, manifest: IndexManifest) -> ImageEncoder:
        """The image encoder, if the index was built in its embedding space.

        Raises:
            NotReady: no model. VersionMismatch: the index was built with another encoder.
        """
        encoder = self.image()
        if manifest.encoder_version != encoder.version:
            raise VersionMismatch(
                f"the index was built with encoder {manifest.encoder_version} but queries are "
                f"embedded with {encoder.version}; run `clusterlens embed` and `clusterlens reindex`"
            )
        return encoder
