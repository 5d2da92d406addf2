//! `--device auto|cpu|cuda[:N]`: where the model runs, and the compute dtype that suits it.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

/// A device as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceArg {
    /// The first GPU in a build with CUDA support where one answers, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// The GPU of this ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("expected auto, cpu, cuda or cuda:N, got `{s}`")),
        }
    }
}

impl fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceArg {
    /// Opens the device. `auto` falls back to the CPU, with a warning, when the build has CUDA
    /// support but no GPU answers.
    pub fn open(self) -> anyhow::Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => open_cuda(ordinal),
            Self::Auto if !candle_core::utils::cuda_is_available() => Ok(Device::Cpu),
            Self::Auto => open_cuda(0).or_else(|e| {
                tracing::warn!("--device auto: no GPU answered ({e:#}); running on the CPU");
                Ok(Device::Cpu)
            }),
        }
    }
}

fn open_cuda(ordinal: usize) -> anyhow::Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        anyhow::bail!(
            "`--device cuda:{ordinal}`: this sdxl was built without CUDA support \
             (build it with tools/gpu/build.sh, or cargo's `cuda` feature)"
        );
    }
    Device::new_cuda(ordinal).map_err(|e| {
        // candle attaches a backtrace to some errors; the message alone is what helps here
        let e = match e {
            candle_core::Error::WithBacktrace { inner, .. } => *inner,
            e => e,
        };
        anyhow::anyhow!("`--device cuda:{ordinal}`: cannot open the GPU: {e}")
    })
}

/// The compute dtype when none is asked for: f32 on the CPU (where f32 is fastest and exact),
/// f16 on a GPU (tensor cores; the VAE still decodes in f32, see docs/gpu.md).
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_device_names() {
        assert_eq!("auto".parse(), Ok(DeviceArg::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceArg::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceArg::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceArg::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", ""] {
            let err = bad.parse::<DeviceArg>().unwrap_err();
            assert!(err.contains("expected auto, cpu, cuda or cuda:N"), "{bad}: {err}");
        }
        assert_eq!(DeviceArg::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn auto_and_cpu_open_the_cpu_without_cuda() {
        assert!(DeviceArg::Cpu.open().unwrap().is_cpu());
        if !candle_core::utils::cuda_is_available() {
            assert!(DeviceArg::Auto.open().unwrap().is_cpu());
            let err = DeviceArg::Cuda(0).open().unwrap_err().to_string();
            assert!(err.contains("built without CUDA support"), "{err}");
        }
    }

    #[test]
    fn the_default_dtype_follows_the_device() {
        assert_eq!(default_dtype(&Device::Cpu), DType::F32);
    }
}
