//! Jobs that share denoiser calls (a cohort) on real exports of each family: each job's pictures are the
//! ones it gets alone, the denoiser runs once per step for the whole cohort, a member that stops leaves the
//! others undisturbed, and a member on another schedule still runs (on its own).

mod common;

use denoised::engine::error::EngineError;
use denoised::engine::model::{LoadedModel, ModelInfo};
use denoised::engine::pipeline::{text_to_image, text_to_image_cohort, CohortMember, GenerateRequest, StepObserver};
use denoised::engine::runtime::Device;
use denoised::engine::scheduler::SchedulerKind;
use image::RgbImage;

fn load(fixture: &str) -> LoadedModel {
    let info = ModelInfo::read(&common::fixture(fixture)).unwrap();
    LoadedModel::load(info, &common::runtime().session_factory(Device::Cpu, 1)).unwrap()
}

fn request(prompt: &str, seed: u64, guidance_scale: f32, images: u32, scheduler: SchedulerKind) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.into(),
        negative_prompt: String::new(),
        width: 64,
        height: 64,
        steps: 6,
        guidance_scale,
        guidance_rescale: 0.0,
        scheduler,
        seed,
        images,
        latents: None,
        watermark: None,
    }
}

/// Records the steps it saw; asks to stop once it has seen `stop_after` of them.
#[derive(Default)]
struct Recorder {
    steps: Vec<usize>,
    previews: usize,
    stop_after: Option<usize>,
}

impl StepObserver for Recorder {
    fn on_step(&mut self, step: usize, _total: usize, preview: Option<RgbImage>) {
        self.steps.push(step);
        self.previews += usize::from(preview.is_some());
    }

    fn preview_wanted(&self, step: usize, _total: usize) -> Option<denoised::engine::preview::PreviewMode> {
        (step % 2 == 0).then_some(denoised::engine::preview::PreviewMode::Approx)
    }

    fn should_stop(&self) -> bool {
        self.stop_after.is_some_and(|n| self.steps.len() >= n)
    }
}

type Outcome = Result<Vec<RgbImage>, EngineError>;

/// Runs `requests` as one cohort with `observers`, returning each member's outcome by index.
fn run_cohort(model: &mut LoadedModel, requests: &[GenerateRequest], observers: &mut [Recorder]) -> Vec<Outcome> {
    let members = requests
        .iter()
        .zip(observers.iter_mut())
        .map(|(request, observer)| CohortMember { request, observer: observer as &mut dyn StepObserver })
        .collect();
    let mut outcomes: Vec<Option<Outcome>> = requests.iter().map(|_| None).collect();
    text_to_image_cohort(model, members, &mut |index, outcome| outcomes[index] = Some(outcome));
    outcomes.into_iter().map(|o| o.expect("every member gets an outcome")).collect()
}

fn alone(model: &mut LoadedModel, request: &GenerateRequest) -> Vec<RgbImage> {
    text_to_image(model, request, &mut Recorder::default()).unwrap()
}

/// The largest difference of one channel of one pixel between two sets of pictures.
fn largest_difference(a: &[RgbImage], b: &[RgbImage]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).flat_map(|(x, y)| x.as_raw().iter().zip(y.as_raw()).map(|(p, q)| p.abs_diff(*q))).max().unwrap_or(0)
}

#[test]
fn each_job_of_a_cohort_gets_the_pictures_it_gets_alone() {
    // Ancestral Euler draws fresh noise every step (each job from its own generators); DPM++ 2M keeps a
    // history per run; SDXL adds pooled embeddings and time ids; SD3 and Flux are flow-matching transformers
    // (Flux without classifier-free guidance).
    let cases = [
        ("tiny-sd", SchedulerKind::EulerA),
        ("tiny-sd", SchedulerKind::Dpmpp2m),
        ("tiny-sdxl", SchedulerKind::Euler),
        ("tiny-sd3", SchedulerKind::FlowEuler),
        ("tiny-flux", SchedulerKind::FlowEuler),
    ];
    for (fixture, scheduler) in cases {
        let mut model = load(fixture);
        let requests = [
            request("a red circle on a blue background", 1, 7.5, 1, scheduler),
            request("a green square", 7, 3.0, 2, scheduler),
            request("", 1, 5.0, 1, scheduler),
        ];
        let expected: Vec<Vec<RgbImage>> = requests.iter().map(|r| alone(&mut model, r)).collect();
        let runs_before = model.denoiser.runs();
        let mut observers: Vec<Recorder> = requests.iter().map(|_| Recorder::default()).collect();
        let outcomes = run_cohort(&mut model, &requests, &mut observers);
        assert_eq!(model.denoiser.runs() - runs_before, 6, "{fixture}: one denoiser call per step for all three");
        for (i, (outcome, expected)) in outcomes.into_iter().zip(&expected).enumerate() {
            let pictures = outcome.unwrap_or_else(|e| panic!("{fixture} member {i}: {e}"));
            assert_eq!(pictures.len(), expected.len());
            let difference = largest_difference(&pictures, expected);
            eprintln!("{fixture} {scheduler:?} member {i}: largest difference from its own run {difference}/255");
            assert_eq!(difference, 0, "{fixture} {scheduler:?} member {i}: its pictures depend on the cohort");
            assert_eq!(observers[i].steps, (1..=6).collect::<Vec<_>>(), "{fixture}: every step reported");
            assert_eq!(observers[i].previews, 3, "{fixture}: its own previews");
        }
    }
}

#[test]
fn a_member_that_stops_leaves_and_the_others_are_undisturbed() {
    let mut model = load("tiny-sd");
    let requests = [
        request("a red circle", 3, 7.5, 1, SchedulerKind::Dpmpp2m),
        request("a blue triangle", 4, 7.5, 1, SchedulerKind::Dpmpp2m),
    ];
    let expected = alone(&mut model, &requests[1]);
    let runs_before = model.denoiser.runs();
    let mut observers = vec![Recorder { stop_after: Some(2), ..Recorder::default() }, Recorder::default()];
    let outcomes = run_cohort(&mut model, &requests, &mut observers);
    assert!(matches!(outcomes[0], Err(EngineError::Cancelled)), "{:?}", outcomes[0].as_ref().err());
    assert_eq!(observers[0].steps, vec![1, 2], "the stopped member left before its third call");
    let pictures = outcomes[1].as_ref().unwrap();
    assert_eq!(largest_difference(pictures, &expected), 0, "the member that stayed was not disturbed");
    assert_eq!(model.denoiser.runs() - runs_before, 6);
}

#[test]
fn a_member_on_another_schedule_runs_on_its_own() {
    let mut model = load("tiny-sd");
    let mut other_steps = request("a yellow circle", 5, 7.5, 1, SchedulerKind::Euler);
    other_steps.steps = 4;
    let requests = [request("a red circle", 3, 7.5, 1, SchedulerKind::Euler), other_steps];
    let expected: Vec<Vec<RgbImage>> = requests.iter().map(|r| alone(&mut model, r)).collect();
    let runs_before = model.denoiser.runs();
    let mut observers = vec![Recorder::default(), Recorder::default()];
    let outcomes = run_cohort(&mut model, &requests, &mut observers);
    assert_eq!(model.denoiser.runs() - runs_before, 6 + 4, "two schedules, two runs");
    for (outcome, expected) in outcomes.iter().zip(&expected) {
        assert_eq!(largest_difference(outcome.as_ref().unwrap(), expected), 0);
    }
}

#[test]
fn a_watermarked_member_keeps_its_watermark_in_a_cohort() {
    use denoised::engine::watermark::{RingKey, WatermarkSpec};
    let mut model = load("tiny-sd");
    let mut marked = request("a red circle", 3, 7.5, 1, SchedulerKind::Euler);
    marked.watermark =
        Some(Box::new(RingKey::derive(b"cohort", WatermarkSpec { radius: 2, channel: 0, strength: 1.0 })));
    let requests = [marked.clone(), request("a red circle", 3, 7.5, 1, SchedulerKind::Euler)];
    let expected: Vec<Vec<RgbImage>> = requests.iter().map(|r| alone(&mut model, r)).collect();
    assert_ne!(largest_difference(&expected[0], &expected[1]), 0, "the watermark changes the starting noise");
    let mut observers = vec![Recorder::default(), Recorder::default()];
    let outcomes = run_cohort(&mut model, &requests, &mut observers);
    for (i, (outcome, expected)) in outcomes.iter().zip(&expected).enumerate() {
        assert_eq!(largest_difference(outcome.as_ref().unwrap(), expected), 0, "member {i}: as alone");
    }
}
