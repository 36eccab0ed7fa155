"""A sequence classifier on a plain nn.LSTM, and the same with lnorm's LayerNormLSTM, for
``lnorm audit`` (input T,F = 20,8; batch first)."""

from torch import nn

from lnorm.nn import LayerNormLSTM


class Classifier(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(32, 5)

    def forward(self, x):  # (B, T, 8)
        out, _ = self.rnn(x)  # (B, T, 32)
        return self.head(out[:, -1])  # (B, 5)


def make_model() -> nn.Module:
    return Classifier(nn.LSTM(8, 32, num_layers=2, batch_first=True))


def make_ln_model() -> nn.Module:
    return Classifier(LayerNormLSTM(8, 32, num_layers=2, batch_first=True))
