"""A stand-in judge for runs of tiny random models, which never write a valid task or a boxed answer.

``install()`` replaces the challenger parser and the reasoner reward used by the rollout: about half
of the challenger outputs become valid integer tasks and about a third of the reasoner answers count
as correct, decided by the bytes of the text, so every role gets non-zero advantages and the update
runs. Deterministic: the same text gets the same verdict in every process.
"""

from spice_fast.spice.parsing import Invalid, Task
from spice_fast.train import rollout


def fake_parse(text, answer_type, *, max_question_chars=2000):
    if sum(text.encode()) % 2:
        return Invalid("unparseable", "fake")
    return Task(question=f"What is {len(text)} mod 7?", answer=str(len(text) % 7), answer_type="integer")


def fake_rewards(responses, golds, answer_types):
    return [float(sum(r.encode()) % 3 == 0) for r in responses]


def install(monkeypatch=None):
    if monkeypatch is None:
        rollout.parse_challenger, rollout.reasoner_rewards = fake_parse, fake_rewards
    else:
        monkeypatch.setattr(rollout, "parse_challenger", fake_parse)
        monkeypatch.setattr(rollout, "reasoner_rewards", fake_rewards)
