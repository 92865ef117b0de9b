"""The ClientApp: decode the instruction, run one local round (or evaluate), encode the reply."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from hfedmoe import faults
from hfedmoe.client import (evaluate_client, process_resources, run_client_round,
                            run_split_exchange)
from hfedmoe.config import RunConfig, parse_run_config
from hfedmoe.measurement import process_memory
from hfedmoe.federation import records
from hfedmoe.personal_store import CLIENT_STATE_DIR, PersonalStore, rounds_to_keep
from hfedmoe.strategies.ho_sfl import split_method


def node_partition(context: Context, config: RunConfig) -> int:
    """This node's ``partition-id``; raises ValueError if the node config's
    ``num-partitions`` (when given) is not the run's ``data.num-clients``: the id would then
    name a partition of another split."""
    partitions = context.node_config.get("num-partitions")
    if partitions is not None and int(partitions) != config.data.num_clients:
        raise ValueError(f"node config num-partitions={partitions} differs from the run's "
                         f"data.num-clients={config.data.num_clients}")
    return int(context.node_config["partition-id"])


def personal_store(context: Context, config: RunConfig, partition_id: int, lineage: str
                   ) -> PersonalStore | None:
    """Where this client keeps its personal state on disk (node config ``state-dir``, else
    ``<out>/client-state``); None when the instruction names no lineage."""
    if not lineage:
        return None
    state_dir = context.node_config.get("state-dir") or Path(config.out) / CLIENT_STATE_DIR
    return PersonalStore.for_client(state_dir, lineage, partition_id,
                                    rounds_to_keep(config.checkpoint.every))


def personal_state(context: Context, store: PersonalStore | None, up_to_round: int
                   ) -> dict[str, torch.Tensor]:
    """The node's personal state: kept in its Context during a Flower run; at the start of a
    resumed run (empty Context), the newest on disk of a round <= ``up_to_round``."""
    state = records.personal_state(context.state)
    if state or store is None:
        return state
    return store.load(up_to_round)


def make_client_app() -> ClientApp:
    """A ClientApp whose calls reuse what their process built (hfedmoe.client.process_resources:
    Flower's Ray backend sends a fresh copy of the app object with every message)."""
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        if records.is_split_instruction(msg.content):
            return split_exchange(msg, context)
        instruction = records.parse_train_instruction(msg.content)
        config = parse_run_config(instruction.run_config)
        partition_id = node_partition(context, config)
        torch.set_num_threads(config.simulation.client_cpus)
        faults.inject_failure(config, partition_id, instruction.server_round)  # testing only
        store = personal_store(context, config, partition_id, instruction.lineage)
        outcome = run_client_round(config, partition_id, instruction.server_round,
                                   instruction.global_state, context.node_config.get("budget"),
                                   process_resources(),
                                   personal_state(context, store, instruction.server_round - 1),
                                   instruction.calibration, instruction.guidance)
        records.store_personal_state(context.state, outcome.personal)
        if store is not None and outcome.personal:
            store.save(instruction.server_round, outcome.personal)
        upload = faults.attacked_upload(config.faults, partition_id, outcome.upload,
                                        instruction.global_state)  # testing only
        content = records.train_reply(partition_id, outcome.budget_experts, upload,
                                      outcome.result, process_memory())
        return Message(content, reply_to=msg)

    def split_exchange(msg: Message, context: Context) -> Message:
        """One exchange of a split-learning round (records: split learning). theta_c of the
        round's first exchange stays in the node state for the second."""
        instruction = records.parse_split_instruction(msg.content)
        config = parse_run_config(instruction.run_config)
        partition_id = node_partition(context, config)
        torch.set_num_threads(config.simulation.client_cpus)
        # testing only: a failing client fails in the round's last exchange (two-exchange
        # methods: after sending its activations)
        if instruction.phase == split_method(config).phases[-1]:
            faults.inject_failure(config, partition_id, instruction.server_round)
        if instruction.client_part is not None:
            client_part = instruction.client_part
            records.store_split_state(context.state, instruction.server_round,
                                      msg.content.array_records[records.CLIENT_PART])
        else:
            client_part = records.split_state(context.state, instruction.server_round)
        answer = run_split_exchange(config, partition_id, instruction.server_round,
                                    instruction.phase, client_part, instruction.seeds,
                                    instruction.cut_gradient, process_resources())
        outputs = answer.outputs
        metrics = records.split_metrics(partition_id, answer.num_examples,
                                        int(answer.attention_mask.shape[0]),
                                        answer.peak_memory_bytes, answer.seconds,
                                        process_memory())
        if "scalars" in outputs:
            content = records.scalars_reply(outputs["scalars"], metrics, outputs.get("active"))
        elif "gradient" in outputs:
            content = records.gradient_reply(outputs["gradient"], metrics)
        else:
            content = records.activations_reply(outputs["z"], answer.attention_mask,
                                                answer.labels, metrics,
                                                outputs.get("perturbed", ()))
        return Message(content, reply_to=msg)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Personalised evaluation: the global model (with this client's personal state, if
        its method keeps one) on the client's own test split."""
        instruction = records.parse_evaluate_instruction(msg.content)
        config = parse_run_config(instruction.run_config)
        partition_id = node_partition(context, config)
        torch.set_num_threads(config.simulation.client_cpus)
        store = personal_store(context, config, partition_id, instruction.lineage)
        result = evaluate_client(config, partition_id, instruction.global_state,
                                 personal_state(context, store, instruction.server_round),
                                 process_resources())
        content = records.evaluate_reply(partition_id, result.num_examples, result.accuracy,
                                         result.loss)
        return Message(content, reply_to=msg)

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        """Which client (partition) this node is: the server samples over client ids
        (hfedmoe.federation.records, identity query)."""
        return Message(records.identity_reply(int(context.node_config["partition-id"])),
                       reply_to=msg)

    return client_app


app = make_client_app()
