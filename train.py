"""Entry for the DeepSpeed launcher: ``deepspeed train.py --deepspeed_config ds_configs/zero2.json ...``
or ``python train.py ...`` for one process. Options: ``python train.py --help``."""

from lvvit.train import main

if __name__ == "__main__":
    main()
