"""CLIP's ResNet image encoder (RN50, RN101, RN50x4 ...): the "modified ResNet" of the CLIP paper.

Three changes to a torchvision ResNet: a stem of three 3x3 convolutions with an average pool instead of one 7x7
convolution and a max pool; anti-aliased strided convolutions (a stride-s block average-pools by s after its 3x3
convolution, and its shortcut average-pools before its 1x1 convolution); and, instead of the global average pool, a
single multi-head attention layer whose query is the mean of the final feature map. Parameter names are OpenAI's
(`visual.layer1.0.conv1.weight`, `visual.attnpool.q_proj.weight`, ...). BatchNorm runs with its stored statistics
(the model is kept in eval mode; nothing in a method trains it).

Dimension legend: B batch, C channels, R image side, S = R / 32 final grid side, N = 1 + S*S attention tokens,
H heads, hd = C / H head width, E joint embedding width.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (avg pool by the stride) -> 1x1 (4x wider), with a shortcut that pools before its 1x1."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:  # keys downsample.0 (conv) and downsample.1 (bn), as OpenAI's
            self.downsample = nn.Sequential()
            self.downsample.add_module("-1", nn.AvgPool2d(stride))
            self.downsample.add_module("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False))
            self.downsample.add_module("1", nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.avgpool(F.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class AttentionPool2d(nn.Module):
    """One attention layer over the final feature map: the query is the mean token, keys and values every token."""

    def __init__(self, grid, width, heads, output_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid ** 2 + 1, width) / width ** 0.5)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.c_proj = nn.Linear(width, output_dim)
        self.heads = heads

    def forward(self, x):
        x = x.flatten(2).transpose(1, 2)  # (B, S*S, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, N, C): the mean token first
        x = x + self.positional_embedding.to(x.dtype)
        B, N, C = x.shape
        q = self.q_proj(x[:, :1]).view(B, 1, self.heads, C // self.heads).transpose(1, 2)  # (B, H, 1, hd)
        k = self.k_proj(x).view(B, N, self.heads, C // self.heads).transpose(1, 2)  # (B, H, N, hd)
        v = self.v_proj(x).view(B, N, self.heads, C // self.heads).transpose(1, 2)  # (B, H, N, hd)
        o = (q @ k.transpose(-2, -1) / math.sqrt(C // self.heads)).softmax(dim=-1) @ v  # (B, H, 1, hd)
        return self.c_proj(o.transpose(1, 2).reshape(B, C))  # (B, E)


class ModifiedResNet(nn.Module):
    def __init__(self, layers, output_dim, heads, input_resolution=224, width=64):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1, self.bn1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width // 2)
        self.conv2, self.bn2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False), nn.BatchNorm2d(width // 2)
        self.conv3, self.bn3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def _make_layer(self, planes, blocks, stride=1):
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * 4
        return nn.Sequential(*layers, *(Bottleneck(self._inplanes, planes) for _ in range(1, blocks)))

    def forward(self, images):
        x = images.to(self.conv1.weight.dtype)  # (B, 3, R, R)
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
        x = self.avgpool(x)  # (B, width, R/4, R/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 32 width, S, S)
        return self.attnpool(x)  # (B, E)
