"""The ClientApp: decode the instruction, run one local round, encode the reply."""

from __future__ import annotations

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from hfedmoe.client import ClientResources, run_client_round
from hfedmoe.config import parse_run_config
from hfedmoe.federation import records


def make_client_app() -> ClientApp:
    """A ClientApp owning the resources its process reuses across rounds and clients."""
    client_app = ClientApp()
    resources = ClientResources()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        instruction = records.parse_train_instruction(msg.content)
        config = parse_run_config(instruction.run_config)
        partition_id = int(context.node_config["partition-id"])
        torch.set_num_threads(config.simulation.client_cpus)
        outcome = run_client_round(config, partition_id, instruction.server_round,
                                   instruction.global_state, context.node_config.get("budget"),
                                   resources)
        content = records.train_reply(partition_id, outcome.budget_experts, outcome.upload,
                                      outcome.result)
        return Message(content, reply_to=msg)

    return client_app


app = make_client_app()
