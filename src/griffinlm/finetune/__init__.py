"""Fine-tuning: LoRA adapters through peft (`lora`, with the fused layer `fused_lora`), instruction
data with the loss on answers only (`data`), and the run on the pre-training loop (`job`, `cli`:
`griffinlm finetune`). Sits on top of `train`; the model never imports it."""
