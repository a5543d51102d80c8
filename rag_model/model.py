"""The RAG model that answers questions over the hot-swapping index. Weights are never trained or changed.

One checkpoint serves both decoding modes: `RagSequenceForGeneration` is loaded, and a
`RagTokenForGeneration` is built around the very same question encoder and generator modules
(no copy), so `mode` is a per-request choice. Both have the `HotSwapRetriever` set through
`set_retriever`; `generate` pins one index version for the whole call (RAG-Sequence retrieves more
than once per generate) and reports that version with the documents it used.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import (
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
    RagTokenizer,
)

from rag_model.index import Hit
from rag_model.retriever import HotSwapRetriever
from storage.errors import RagindexError

Mode = Literal["sequence", "token"]


@dataclass
class GenerateResult:
    answer: str
    version: str
    mode: str
    docs: list[Hit]

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.answer, "version": self.version, "mode": self.mode,
                "docs": [d.to_dict() for d in self.docs]}


class RagService:
    def __init__(
        self,
        model: RagSequenceForGeneration,
        question_tokenizer: Any,
        generator_tokenizer: Any,
        *,
        cache_dir: str | None = None,
        expected_fingerprint_key: str | None = None,
        model_id: str | None = None,
    ) -> None:
        from rag_model.encoders import QuestionEncoder

        model.eval()
        config: RagConfig = model.config
        self.model_id = model_id
        self.question_tokenizer = question_tokenizer
        self.generator_tokenizer = generator_tokenizer
        qconfig = config.question_encoder
        dim = getattr(qconfig, "projection_dim", 0) or qconfig.hidden_size
        # /v1/retrieve uses the RAG model's own question encoder module, so retrieval and generation
        # see the same question vectors.
        question_encoder = QuestionEncoder(
            model_id or "rag.question_encoder", "dpr", model.question_encoder, question_tokenizer, dim,
            normalize=False, max_length=256, device="cpu",
        )
        self.retriever = HotSwapRetriever(
            question_encoder, config=config, generator_tokenizer=generator_tokenizer, cache_dir=cache_dir,
            expected_fingerprint_key=expected_fingerprint_key, with_embeddings=True,
        )
        token_model = RagTokenForGeneration(config, question_encoder=model.question_encoder,
                                            generator=model.generator).eval()
        self.models: dict[str, Any] = {"sequence": model, "token": token_model}
        for m in self.models.values():
            m.set_retriever(self.retriever)
            m.requires_grad_(False)
        self._lock = threading.Lock()  # one generate at a time: torch already uses every core for one

    @classmethod
    def from_pretrained(cls, rag_model: str, **kwargs: Any) -> RagService:
        """Load a RAG checkpoint (an HF id such as facebook/rag-sequence-nq, or a local directory)."""
        try:
            config = RagConfig.from_pretrained(rag_model)
            tokenizer = RagTokenizer.from_pretrained(rag_model, config=config)
            model = RagSequenceForGeneration.from_pretrained(rag_model, config=config)
        except OSError as exc:
            raise RagindexError(f"cannot load RAG model {rag_model!r}: {str(exc).splitlines()[0]}") from None
        return cls(model, tokenizer.question_encoder, tokenizer.generator, model_id=rag_model, **kwargs)

    @property
    def sequence_model(self) -> RagSequenceForGeneration:
        return self.models["sequence"]

    def generate(self, question: str, n_docs: int = 5, mode: Mode = "sequence",
                 max_new_tokens: int = 32) -> GenerateResult:
        if mode not in self.models:
            raise RagindexError(f"unknown mode {mode!r}: use sequence or token")
        if not question.strip():
            raise RagindexError("empty question")
        model = self.models[mode]
        with self._lock, torch.inference_mode(), self.retriever.pinned() as index:
            if n_docs > index.size:
                raise RagindexError(f"n_docs={n_docs} but version {index.version} has only {index.size} passages")
            inputs = self.question_tokenizer([question], return_tensors="pt", truncation=True, max_length=256)
            self.retriever.reset_records()
            output = model.generate(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], n_docs=n_docs,
                max_new_tokens=max_new_tokens, num_beams=1, num_return_sequences=1,
            )
            record = self.retriever.first_record()
        if record is None or record.version != index.version:  # cannot happen while pinned; never report a guess
            raise RagindexError("the model did not retrieve through the serving index")
        answer = self.generator_tokenizer.batch_decode(output, skip_special_tokens=True)[0].strip()
        docs = index.hits(record.doc_scores[0], record.doc_ids[0])
        return GenerateResult(answer=answer, version=index.version, mode=mode, docs=docs)
