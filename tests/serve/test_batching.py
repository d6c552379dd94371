import asyncio

import pytest
import torch

from p2ch_app.inference.pipeline import class1_probability
from p2ch_app.serve.batching import BatchSettings, CropBatcher, Overloaded


def crops(n: int) -> torch.Tensor:
    return torch.randn(n, 1, 32, 48, 48, generator=torch.Generator().manual_seed(n)) * 300 - 500


def test_concurrent_crops_share_a_pass_and_get_their_unbatched_answers(models):
    sizes = []
    batcher = CropBatcher({"nodule_prob": models.classifier}, torch.device("cpu"), BatchSettings(8, 50.0, 64),
                          sizes.append)
    x = crops(12)

    async def main():
        batcher.start()
        answers = await asyncio.gather(*(batcher.predict(crop) for crop in x))
        await batcher.close()
        return answers

    answers = asyncio.run(main())
    with torch.inference_mode():
        alone = [class1_probability(models.classifier, crop[None]).item() for crop in x]
    assert [a["nodule_prob"] for a in answers] == pytest.approx(alone, abs=1e-6)
    assert sizes == [8, 4]  # stacked up to max_batch, the rest in a second pass


def test_a_full_queue_refuses_at_once_and_close_answers_what_was_queued(models):
    batcher = CropBatcher({"nodule_prob": models.classifier}, torch.device("cpu"), BatchSettings(2, 0.0, 3))

    async def main():
        batcher.start()
        queued = [asyncio.ensure_future(batcher.predict(crop)) for crop in crops(3)]
        await asyncio.sleep(0)  # all three are in the queue; the pass has not started
        with pytest.raises(Overloaded, match=r"queue is full \(3 waiting\)"):
            await batcher.predict(crops(1)[0])
        await batcher.close()
        return [q.result() for q in queued]

    assert all(0 <= a["nodule_prob"] <= 1 for a in asyncio.run(main()))


def test_a_failing_pass_fails_its_crops_and_the_batcher_goes_on(models):
    calls = []

    def forward(x):
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return [{"nodule_prob": 0.5}] * len(x)

    batcher = CropBatcher({"nodule_prob": models.classifier}, torch.device("cpu"), BatchSettings(4, 0.0, 8))
    batcher.forward = forward

    async def main():
        batcher.start()
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.predict(crops(1)[0])
        answer = await batcher.predict(crops(1)[0])
        await batcher.close()
        return answer

    assert asyncio.run(main()) == {"nodule_prob": 0.5}
