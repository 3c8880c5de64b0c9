"""A client's tokenised data and the batch stream that persists across rounds.

Local "epochs" are not real epochs: each client keeps one stream over its shuffled training set, every round
consumes `local_steps` batches from where the previous round stopped, and an exhausted stream is reshuffled
and restarted. The stream position (`cursor`) is plain data, so it survives in checkpoints and in Flower's
per-node state. Shuffles are seeded by (seed, client, epoch), so a cursor fully determines what comes next.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmole.data.partition import ClientData
from fedmole.data.schema import Example
from fedmole.data.tokenize import encode_train


@dataclass
class EncodedClient:
    client_id: int
    train: list[dict]  # encode_train outputs (input_ids, labels)
    aux: list[dict]
    val: list[Example]
    test: list[Example]
    num_train_examples: int


def encode_client(client: ClientData, tokenizer, data_cfg, max_length: int, eval_max: int | None) -> EncodedClient:
    def enc(examples):
        out = []
        for ex in examples:
            e = encode_train(ex, tokenizer, data_cfg.prompt, max_length, data_cfg.system_prompt)
            if e is not None:
                out.append(e)
        return out

    train = enc(client.train)
    return EncodedClient(
        client_id=client.client_id,
        train=train,
        aux=enc(client.aux),
        val=client.val[:eval_max] if eval_max else list(client.val),
        test=client.test[:eval_max] if eval_max else list(client.test),
        num_train_examples=len(train),
    )


class BatchStream:
    """Yields lists of example indices; the last batch of an epoch may be short."""

    def __init__(self, n: int, batch_size: int, seed: int, client_id: int, cursor: dict | None = None):
        if n <= 0:
            raise ValueError(f"client {client_id} has no training examples")
        self.n, self.batch_size, self.seed, self.client_id = n, batch_size, seed, client_id
        cursor = cursor or {"epoch": 0, "pos": 0}
        self.epoch, self.pos = int(cursor["epoch"]), int(cursor["pos"])
        self._perm = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.client_id, epoch]).permutation(self.n)

    @property
    def cursor(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def next(self) -> list[int]:
        if self.pos >= self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        idx = self._perm[self.pos : self.pos + self.batch_size].tolist()
        self.pos += len(idx)
        return idx
