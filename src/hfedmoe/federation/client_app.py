"""The ClientApp: decode the instruction, run one local round, encode the reply."""

from __future__ import annotations

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from hfedmoe.client import run_client_round
from hfedmoe.config import parse_run_config
from hfedmoe.federation import records

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    instruction = records.parse_train_instruction(msg.content)
    config = parse_run_config(instruction.run_config)
    partition_id = int(context.node_config["partition-id"])
    torch.set_num_threads(config.simulation.client_cpus)
    outcome = run_client_round(config, partition_id, instruction.server_round,
                               instruction.global_state, context.node_config.get("budget"))
    content = records.train_reply(partition_id, outcome.budget_experts, outcome.upload,
                                  outcome.result)
    return Message(content, reply_to=msg)
