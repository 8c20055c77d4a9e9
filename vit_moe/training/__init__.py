"""Training and evaluation with Hugging Face Accelerate (`pip install "vit-moe[train]"`)."""
from .._extras import require_extra

require_extra('train', ('accelerate', 'torchmetrics', 'yaml', 'tqdm'), 'vit_moe.training')

from .checkpoints import TrainState, complete_checkpoints, latest_checkpoint  # noqa: E402
from .config import ConfigError, TrainConfig, load_config, parse_train_args  # noqa: E402
from .evaluation import evaluate, fresh_accelerator_state, validate  # noqa: E402
from .loop import NonFiniteLossError, Trainer, forward_loss, train  # noqa: E402
from .optim import create_optimizer, param_groups  # noqa: E402
from .schedule import learning_rate  # noqa: E402
