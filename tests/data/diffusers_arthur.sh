# FLUX.1-dev LoRA of Arthur, as in the write-up's table: rank 32, alpha 16, lr 1e-4,
# AdamW (weight decay 1e-4), batch 8, 1024x1024, gradient checkpointing, attention projections only.
export MODEL_NAME="black-forest-labs/FLUX.1-dev"
export DATA_DIR="arthur"   # the photos and a metadata.jsonl of {"file_name", "text"} captions

accelerate launch --mixed_precision="bf16" train_dreambooth_lora_flux.py \
  --pretrained_model_name_or_path=$MODEL_NAME \
  --dataset_name=$DATA_DIR \
  --caption_column="text" \
  --instance_prompt="Arthur" \
  --output_dir="arthur-flux-lora" \
  --resolution=1024 \
  --train_batch_size=8 \
  --gradient_checkpointing \
  --rank=32 \
  --lora_alpha=16 \
  --lora_layers="to_q,to_k,to_v,to_out.0" \
  --learning_rate=1e-4 \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --optimizer="AdamW" \
  --adam_weight_decay=1e-4 \
  --weighting_scheme="logit_normal" \
  --logit_mean=0.0 \
  --logit_std=1.0 \
  --mode_scale=1.29 \
  --num_train_epochs=800 \
  --validation_prompt="A picture of Arthur. He is wearing a tuxedo." \
  --validation_epochs=25 \
  --checkpointing_steps=500 \
  --seed=0
