"""Optimizer state dicts re-keyed: torch's index-keyed layout (optimizer.pt) <-> the FQN-keyed one
(torch DCP's ``get_state_dict``) that a checkpoint of any backend is reassembled into."""

from __future__ import annotations

from .files import CheckpointError



def optimizer_by_name(state: dict, names: list[list[str]]) -> dict:
    """torch's index-keyed optimizer state dict -> FQN-keyed (torch DCP's ``get_state_dict`` layout):
    ``names``: the parameter names of each param group, in order (saved in trainer.pt)."""
    flat = [n for group in names for n in group]
    if len(flat) != sum(len(g["params"]) for g in state["param_groups"]):
        raise CheckpointError(f"the optimizer state has {sum(len(g['params']) for g in state['param_groups'])} "
                              f"parameters, the model {len(flat)}; it was saved for another model")
    return {"state": {flat[i]: v for i, v in state["state"].items()},
            "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": [flat[i] for i in g["params"]]}
                             for g in state["param_groups"]],
            "am_state": state.get("am_state")}


def optimizer_by_index(optim: dict, names: list[list[str]]) -> dict:
    """FQN-keyed optimizer state -> torch's index-keyed one for an optimizer whose groups hold the
    parameters ``names`` (in order). The groups must hold the same parameters as when saved."""
    pos, index = {}, 0
    groups = []
    for g, (group_names, saved) in enumerate(zip(names, optim["param_groups"])):
        if set(group_names) != set(saved["params"]):
            raise CheckpointError(f"optimizer param group {g} holds other parameters than when it was saved; "
                                  f"resume with the optimizer settings the run was saved with")
        for n in group_names:
            pos[n] = index
            index += 1
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": [pos[n] for n in group_names]})
    if len(names) != len(optim["param_groups"]):
        raise CheckpointError(f"the optimizer has {len(names)} param groups, the checkpoint "
                              f"{len(optim['param_groups'])}; resume with the settings it was saved with")
    state = {"state": {pos[n]: v for n, v in optim["state"].items() if n in pos}, "param_groups": groups}
    if optim.get("am_state") is not None:
        state["am_state"] = optim["am_state"]
    return state
