"""Language identification with py3langid (its model ships in the package, 97 languages)."""

from __future__ import annotations

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter


class Language(BaseFilter):
    """The document's language and confidence into metadata; documents in a language not
    kept, or identified with less than its confidence threshold, removed."""

    name = "language"

    def __init__(self, keep=("en",), min_confidence=0.5, confidence=None, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.keep = set(keep)
        self.min_confidence = min_confidence
        self.confidence = dict(confidence or {})
        self._identifier = None

    def identify(self, text: str) -> tuple[str, float]:
        if self._identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        language, score = self._identifier.classify(text.replace("\n", " "))
        return language, float(score)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        language, score = self.identify(doc.text)
        doc.metadata["language"] = language
        doc.metadata["language_score"] = round(score, 4)
        if self.keep and language not in self.keep:
            return False, f"language_{language}"
        if score < self.confidence.get(language, self.min_confidence):
            return False, "low_confidence"
        return True
