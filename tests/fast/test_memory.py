"""llama_gen.fast.memory: weights moved onto huge pages, in place, never held twice."""

import os

import torch

from llama_gen.fast.memory import HUGE_PAGE, move_to_huge_pages


def advised_huge(tensor: torch.Tensor) -> bool:
    """True when the mapping holding this tensor carries MADV_HUGEPAGE ("hg" in /proc/self/smaps VmFlags)."""
    address, inside = tensor.data_ptr(), False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and ":" not in fields[0]:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                inside = start <= address < end
            elif inside and fields[0] == "VmFlags:":
                return "hg" in fields[1:]
    return False


def test_move_to_huge_pages_keeps_outputs_sharing_and_embeddings(tmp_path):
    embedding = torch.nn.Embedding(100, 64)
    model = torch.nn.Sequential(
        embedding, torch.nn.Linear(64, 4096, bias=False), torch.nn.Linear(4096, 100, bias=False)
    )
    model[2].weight = torch.nn.Parameter(torch.randn(100, 4096))
    model.register_buffer("scale", torch.tensor([2.0]))
    shared = torch.nn.Linear(4096, 100, bias=False)
    shared.weight = model[2].weight
    model.append(shared)  # the same parameter held by two modules
    torch.save(model[1].weight.detach().clone(), tmp_path / "w.pt")
    model[1].weight = torch.nn.Parameter(torch.load(tmp_path / "w.pt", mmap=True, weights_only=True))  # mapped file
    tokens = torch.tensor([[1, 5, 7]])
    expected = model[2](model[1](model[0](tokens))) * model.scale
    table = embedding.weight.data_ptr()
    move_to_huge_pages(model)
    assert torch.equal(model[2](model[1](model[0](tokens))) * model.scale, expected)
    assert embedding.weight.data_ptr() == table  # read by rows: left in place
    assert model[3].weight is model[2].weight
    storages = {t.untyped_storage().data_ptr() for t in (model[1].weight, model[2].weight, model.scale)}
    assert len(storages) == 1  # one allocation ...
    assert min(t.data_ptr() for t in (model[1].weight, model[2].weight, model.scale)) % HUGE_PAGE == 0  # ... aligned
    if os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
        assert advised_huge(model[1].weight)
