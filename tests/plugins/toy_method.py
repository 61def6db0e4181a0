"""A toy method: an extra trainable critic, alternating phases, a target network, a frozen net, a
step-gated term and optionally a frozen slice of the model; it runs through the unchanged loop."""
import os, signal  # noqa: E401
from dataclasses import dataclass
import torch
import cmgen.methods as cm
from cmgen.recipe import OptimConfig


@dataclass(frozen=True)
class Config:
    gate_at: int = 3                 # the 'late' term switches on at this step
    freeze_input: bool = False       # freeze the model's input layer (a LoRA base's stand-in)


class Method(cm.Method):
    def __init__(self, cfg, recipe, gen):
        super().__init__(cfg, recipe, gen)
        self.critic, self.teacher = torch.nn.Linear(gen.shape[0], 1), torch.nn.Linear(gen.shape[0], gen.shape[0])
        gen.net.backbone.inp.requires_grad_(not cfg.freeze_input)

    def frozen(self): return {"teacher": self.teacher}
    def parts(self): return {"critic": cm.Part(self.critic, OptimConfig(name="adam", lr=1e-2), ema_decay=0.5)}
    def targets(self): return {"slow": 0.5}
    def phases(self, step): return ("model",) if step % 2 == 0 else ("critic",)

    def loss(self, nets, batch, step):
        if step == int(os.environ.get("TOY_KILL_AT", -1)):
            os.kill(os.getpid(), signal.SIGKILL)
        sigma = 0.5 + batch.rng.rand()
        pred = nets.model(batch.x + sigma[:, None] * batch.rng.randn(*batch.x.shape[1:]), sigma, None)
        if batch.phase == "critic":
            return {"loss": (nets.critic(pred.detach()) - pred.detach().pow(2).sum(1, keepdim=True)).pow(2).mean()}
        late = float(cm.gate(step, self.cfg.gate_at)) * (pred - nets.teacher(batch.x)).pow(2).mean()
        fit = (pred - nets.slow(batch.x, sigma, None).detach()).pow(2).mean() + (pred - batch.x).pow(2).mean()
        return {"loss": fit + late, "late": late.detach()}
