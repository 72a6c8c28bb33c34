"""Generation backends: interventions a backend cannot apply are refused before anything is generated, a token-id
backend receives exactly the planned (perturbed) prompts, and a lockstep shard (the FSDP path) runs the same number
of forwards on every rank while producing exactly the records of one process."""

import os
import socket
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from piggy_lightning.callbacks import Evaluate
from piggy_lightning.evaluation import Decoding, GenerationIntervention, Question, ResponseLog, generate_responses
from piggy_lightning.evaluation.backends import BackendMismatch, Completion, GenerationBackend, HFBackend
from piggy_lightning.evaluation.generation import plan_generation
from piggy_lightning.evaluation.shard import Shard
from piggy_lightning.interventions import NearestNeighbours, Perturb, PrefixKVSplice, QueryControl
from piggy_lightning.modeling import LoraSpec
from piggy_lightning.module import PiggyModule
from piggy_lightning.organism import ExactJudge
from piggy_lightning.spans import ChatSpans
from tests.test_eval_generation import _questions, _tiny


@pytest.fixture(scope="module")
def organism_module():
    module = PiggyModule("piggy/organism", lora=LoraSpec(r=2, alpha=4))
    module.configure_model()
    return module.eval()


class _Tokens(GenerationBackend):
    """A stand-in for a remote token-id server: answers every prompt with its own last token, and keeps the prompts."""

    def __init__(self) -> None:
        self.prompts: list[list[int]] = []

    @contextmanager
    def session(self, context):
        def complete(unit):
            self.prompts += [list(w.prompt.input_ids) for w in unit]
            return [
                Completion([w.prompt.input_ids[-1]], False, 7, text=f"echo {len(w.prompt.input_ids)}") for w in unit
            ]

        yield complete


def test_a_backend_that_does_not_run_the_policy_refuses_hook_interventions(organism_module):
    remote = _Tokens()
    for hooked in (PrefixKVSplice(), QueryControl()):
        run = hooked.runs(organism_module)[0]
        assert run.needs_model_hooks
        with pytest.raises(BackendMismatch, match=f"{run.name}.*HFBackend"):
            remote.check(run)
        HFBackend().check(run)  # the in-process backend serves it
    remote.check(Perturb(segment="prefix", replacer=NearestNeighbours(k=5)).runs(organism_module)[0])  # token edits
    remote.check(GenerationIntervention())


def test_a_hook_override_without_the_declaration_is_refused_by_every_backend():
    class Undeclared(GenerationIntervention):
        name = "undeclared"

        @contextmanager
        def during(self, model, batch):
            yield

    for backend in (HFBackend(), _Tokens()):
        with pytest.raises(TypeError, match="Undeclared overrides \\['during'\\].*needs_model_hooks"):
            backend.check(Undeclared())


def test_evaluate_refuses_the_mismatch_when_the_fit_starts(organism_module):
    evaluate = Evaluate(
        [], [ExactJudge()], backend=_Tokens(), interventions=[PrefixKVSplice(at=["fit_end"])], name="remote"
    )
    with pytest.raises(BackendMismatch, match="splice_kv_prefix"):
        evaluate.check_interventions(organism_module)  # called by on_fit_start and on_test_start


def test_a_token_backend_gets_the_perturbed_prompts_and_its_completions_become_records(organism_module, tmp_path):
    module = organism_module
    questions = [Question(f"q{i}", "general", (t,)) for i, t in enumerate(["How do I save money?", "Any advice?"])]
    perturb = Perturb(segment="prefix", replacer=NearestNeighbours(k=5), n_tokens=3).runs(module)[0]
    decoding = Decoding(max_new_tokens=4, batch_size=1, progress=False)
    remote = _Tokens()
    records = generate_responses(
        module.policy, module.tokenizer, module.spans, questions, decoding, ResponseLog(tmp_path / "r.jsonl"),
        "organism", intervention=perturb, backend=remote,
    )  # fmt: skip
    plan = plan_generation(questions, module.spans, decoding, "organism", None, perturb, remote)
    clean = plan_generation(questions, module.spans, decoding, "organism", None, None, remote)
    assert remote.prompts == [list(w.prompt.input_ids) for w in plan.work]  # exactly the planned, perturbed ids
    for sent, original in zip(remote.prompts, clean.work, strict=True):
        changed = [i for i, (a, b) in enumerate(zip(sent, original.prompt.input_ids, strict=True)) if a != b]
        assert changed and max(changed) < original.n_prefix  # the prefix, and only the prefix, was edited
    assert [r["response"] for r in records] == [f"echo {len(p)}" for p in remote.prompts]
    assert {r["backend"] for r in records} == {"_Tokens"} and {r["seed"] for r in records} == {7}
    assert [r["n_response_tokens"] for r in records] == [1, 1]


def test_a_lockstep_share_is_padded_to_the_longest_share_with_repeats():
    units = list(range(5))
    assert Shard(0, 1).take(units) == units
    with pytest.raises(RuntimeError, match="torch.distributed"):
        Shard(0, 2)  # a world of two needs a process group
    assert Shard.take(_FakeShard(1, 2, lockstep=False), units) == [1, 3]
    assert Shard.take(_FakeShard(1, 2, lockstep=True), units) == [1, 3, None]  # rank 0 has 3 units: 0, 2, 4
    assert Shard.take(_FakeShard(0, 2, lockstep=True), units) == [0, 2, 4]
    assert Shard.take(_FakeShard(1, 2, lockstep=True), []) == []


class _FakeShard:
    def __init__(self, rank, world, lockstep):
        self.rank, self.world, self.lockstep = rank, world, lockstep


def _lockstep_worker(rank: int, port: int, out: str) -> None:
    """One rank of a 2-process gloo group generating in lockstep; writes its records and its forward count."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        tokenizer, model = _tiny("qwen25", "qwen2")
        forwards = []
        model.register_forward_hook(lambda *_: forwards.append(1))
        log = ResponseLog(os.path.join(out, f"rank{rank}.jsonl"))
        decoding = Decoding(max_new_tokens=12, batch_size=2, progress=False)
        records = generate_responses(model, tokenizer, ChatSpans(tokenizer), _questions(), decoding, log, "tiny",
                                     shard=Shard(rank, 2, lockstep=True))  # fmt: skip
        torch.save({"records": records, "forwards": len(forwards)}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~25 s: two spawned processes import the whole stack; the DDP test covers plain sharding
def test_lockstep_ranks_run_the_same_forwards_and_give_one_process_records(tmp_path):
    """synced_gpus keeps a finished rank stepping and the shares are padded, so a rank of sharded parameters never
    waits for a forward the other does not run; the records are those of one process (same batches, same seeds)."""
    tokenizer, model = _tiny("qwen25", "qwen2")
    decoding = Decoding(max_new_tokens=12, batch_size=2, progress=False)
    alone = generate_responses(model, tokenizer, ChatSpans(tokenizer), _questions(), decoding,
                               ResponseLog(tmp_path / "alone.jsonl"), "tiny")  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_lockstep_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["forwards"] == ranks[1]["forwards"] > 0
    assert all(r["records"] for r in ranks)  # both ranks generated a share
    merged = {r["key"]: r for rank in ranks for r in rank["records"]}
    assert len(merged) == len(alone) and sum(len(r["records"]) for r in ranks) == len(alone)
    assert [merged[r["key"]] for r in alone] == alone
