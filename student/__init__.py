"""The causal STFT FNet student: model, losses, training loop.

Importing the package registers the student with transformers' ``AutoConfig`` / ``AutoModelForCausalLM``
(``model_type`` causal_stft_fnet), so ``AutoModelForCausalLM.from_pretrained(DIR)`` works in this project
without ``trust_remote_code``; elsewhere the folder's own copy of the model code is used.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from student.configuration_causal_fnet import CausalFNetConfig
from student.modeling_causal_fnet import CausalFNetForCausalLM

AutoConfig.register(CausalFNetConfig.model_type, CausalFNetConfig, exist_ok=True)
AutoModelForCausalLM.register(CausalFNetConfig, CausalFNetForCausalLM, exist_ok=True)
