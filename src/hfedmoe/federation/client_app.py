"""The ClientApp: decode the instruction, run one local round (or evaluate), encode the reply."""

from __future__ import annotations

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from hfedmoe import faults
from hfedmoe.client import ClientResources, evaluate_client, run_client_round
from hfedmoe.config import RunConfig, parse_run_config
from hfedmoe.federation import records


def node_partition(context: Context, config: RunConfig) -> int:
    """This node's ``partition-id``; raises ValueError if the node config's
    ``num-partitions`` (when given) is not the run's ``data.num-clients``: the id would then
    name a partition of another split."""
    partitions = context.node_config.get("num-partitions")
    if partitions is not None and int(partitions) != config.data.num_clients:
        raise ValueError(f"node config num-partitions={partitions} differs from the run's "
                         f"data.num-clients={config.data.num_clients}")
    return int(context.node_config["partition-id"])


def make_client_app() -> ClientApp:
    """A ClientApp owning the resources its process reuses across rounds and clients."""
    client_app = ClientApp()
    resources = ClientResources()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        instruction = records.parse_train_instruction(msg.content)
        config = parse_run_config(instruction.run_config)
        partition_id = node_partition(context, config)
        torch.set_num_threads(config.simulation.client_cpus)
        faults.inject_failure(config, partition_id, instruction.server_round)  # testing only
        outcome = run_client_round(config, partition_id, instruction.server_round,
                                   instruction.global_state, context.node_config.get("budget"),
                                   resources, records.personal_state(context.state))
        records.store_personal_state(context.state, outcome.personal)
        upload = faults.attacked_upload(config.faults, partition_id, outcome.upload,
                                        instruction.global_state)  # testing only
        content = records.train_reply(partition_id, outcome.budget_experts, upload,
                                      outcome.result)
        return Message(content, reply_to=msg)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Personalised evaluation: the global model (with this client's personal state, if
        its method keeps one) on the client's own test split."""
        instruction = records.parse_evaluate_instruction(msg.content)
        config = parse_run_config(instruction.run_config)
        partition_id = node_partition(context, config)
        torch.set_num_threads(config.simulation.client_cpus)
        result = evaluate_client(config, partition_id, instruction.global_state,
                                 records.personal_state(context.state), resources)
        content = records.evaluate_reply(partition_id, result.num_examples, result.accuracy,
                                         result.loss)
        return Message(content, reply_to=msg)

    return client_app


app = make_client_app()
