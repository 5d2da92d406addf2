//! Golden test: Euler timestep/sigma tables for every spacing, beta schedule, step count and
//! offset, and the `scale_model_input` / `step` / `add_noise` arithmetic, against diffusers.

mod common;

use candle_core::Tensor;
use common::{assert_close, fixtures, golden, Tol};
use sdxl_models::scheduler::{Scheduler, SchedulerConfig};
use serde::Deserialize;

/// Sigmas are f32 values diffusers derives through f32 torch ops; allow a few ulps for
/// summation order (torch's linspace and cumprod kernels).
const SIGMA_RTOL: f32 = 2e-6;
/// Step arithmetic on f32 tensors.
const STEP_TOL: Tol = Tol { atol: 1e-5, rtol: 1e-5 };

#[derive(Deserialize)]
struct TableCase {
    config: SchedulerConfig,
    steps: usize,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
}

fn read<T: for<'de> Deserialize<'de>>(name: &str) -> T {
    let text = std::fs::read_to_string(fixtures().join("golden").join(name)).expect("read golden json");
    serde_json::from_str(&text).expect("parse golden json")
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= SIGMA_RTOL * b.abs()
}

#[test]
fn timestep_and_sigma_tables_match_diffusers() {
    let cases: Vec<TableCase> = read("scheduler.json");
    assert!(cases.len() >= 108, "expected the full grid of scheduler cases");
    for case in cases {
        let what = format!(
            "{} {} offset {} steps {}",
            case.config.timestep_spacing, case.config.beta_schedule, case.config.steps_offset, case.steps
        );
        let schedule = Scheduler::new(&case.config).expect(&what).schedule(case.steps).expect(&what);
        assert_eq!(schedule.timesteps, case.timesteps, "{what}: timesteps");
        assert_eq!(schedule.sigmas.len(), case.sigmas.len(), "{what}: sigma count");
        for (i, (&a, &b)) in schedule.sigmas.iter().zip(&case.sigmas).enumerate() {
            assert!(close(a, b), "{what}: sigma {i} is {a}, expected {b}");
        }
        assert!(
            close(schedule.init_noise_sigma, case.init_noise_sigma),
            "{what}: init_noise_sigma {} vs {}",
            schedule.init_noise_sigma,
            case.init_noise_sigma
        );
    }
}

#[derive(Deserialize)]
struct StepGolden {
    config: SchedulerConfig,
}

#[test]
fn step_arithmetic_matches_diffusers() {
    let meta: StepGolden = read("scheduler_step.json");
    let g = golden("scheduler_step.safetensors");
    for (prediction, name) in [("epsilon", "epsilon"), ("sample", "sample"), ("v_prediction", "v_prediction")] {
        let config = SchedulerConfig { prediction_type: prediction.into(), ..meta.config.clone() };
        let schedule = Scheduler::new(&config).expect("config").schedule(3).expect("schedule");
        let mut sample: Tensor = (&g["sample"] * f64::from(schedule.init_noise_sigma)).expect("scale");
        assert_close(&format!("{name} initial"), &sample, &g[&format!("{name}_initial")], STEP_TOL);
        let mut stepper = schedule.stepper();
        for i in 0..3 {
            let scaled = schedule.scale_model_input(&sample, i).expect("scale_model_input");
            assert_close(&format!("{name} {i} scaled"), &scaled, &g[&format!("{name}_{i}_scaled")], STEP_TOL);
            sample = stepper.step(&g[&format!("model_output_{i}")], i, &sample, &mut |_| unreachable!()).expect("step");
            assert_close(&format!("{name} {i} prev"), &sample, &g[&format!("{name}_{i}_prev_sample")], STEP_TOL);
        }
    }
    let schedule = Scheduler::new(&meta.config).expect("config").schedule(3).expect("schedule");
    for i in 0..3 {
        let noisy = schedule.add_noise(&g["sample"], &g["noise"], i).expect("add_noise");
        assert_close(&format!("add_noise {i}"), &noisy, &g[&format!("add_noise_{i}")], STEP_TOL);
    }
}
