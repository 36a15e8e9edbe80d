//! Several text-to-image jobs sharing their denoiser calls: a **cohort** of jobs for the same model, picture
//! size, scheduler and number of steps walks the same timesteps, so one U-Net call can serve all of them.
//! optimum's exports take one timestep per call, which is why only jobs at the same point of the same schedule
//! can share it.
//!
//! Every member keeps what makes its pictures its own: its noise generators, its prompt encoding, its
//! guidance scale and rescale, its scheduler state (multistep schedulers keep a history per run), its
//! previews, progress and stop flag. The denoiser batch is the members' own batches side by side (each
//! member's `[uncond × n, cond × n]` block, as it would be alone), and each member's rows of the output
//! go through exactly the arithmetic of a run on its own. A member that stops leaves the cohort before the
//! next call; the others go on.

use image::RgbImage;
use ndarray::{concatenate, ArrayD, Axis};

use super::conditioning::UnetConditioning;
use super::denoise::{predict, Guidance};
use super::noise::BatchNoise;
use super::text_to_image::{prepare, text_to_image, Prepared};
use super::vae::{decode, render_preview, ShiftOnDecode};
use super::{GenerateRequest, RunExtras, StepObserver};
use crate::engine::error::EngineError;
use crate::engine::graph::BoundInputs;
use crate::engine::model::LoadedModel;
use crate::engine::scheduler::{Scheduler, SchedulerKind, StepInput};

/// One job of a cohort: its request and where its progress goes.
pub struct CohortMember<'a> {
    /// The job's validated request.
    pub request: &'a GenerateRequest,
    /// Its progress, previews and stop flag.
    pub observer: &'a mut dyn StepObserver,
}

/// What text-to-image runs must have in common to share denoiser calls: the same picture size, scheduler,
/// step count and number of guidance branches (guidance on or off); guidance scales, prompts, seeds and image
/// counts may differ. The one home of that rule: the engine forms cohorts by it ([`can_share`]) and the job
/// store finds queued jobs that can join one by its [`label`](Self::label) (`JobParams::batch_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleKey {
    width: u32,
    height: u32,
    steps: u32,
    scheduler: SchedulerKind,
    guided: bool,
}

impl ScheduleKey {
    /// The key of a run of `width × height` pictures over `steps` steps of `scheduler` at `guidance_scale`.
    pub fn new(width: u32, height: u32, steps: u32, scheduler: SchedulerKind, guidance_scale: f32) -> Self {
        Self { width, height, steps, scheduler, guided: guidance_scale > 1.0 }
    }

    /// The key of `request`.
    pub fn of(request: &GenerateRequest) -> Self {
        Self::new(request.width, request.height, request.steps, request.scheduler, request.guidance_scale)
    }

    /// The key as text, `64x64|20|euler|guided`: stored with queued jobs, so it must stay stable.
    pub fn label(&self) -> String {
        let guided = if self.guided { "guided" } else { "unguided" };
        format!("{}x{}|{}|{}|{guided}", self.width, self.height, self.steps, self.scheduler.name())
    }
}

/// Whether two requests walk the same schedule and may share denoiser calls (same [`ScheduleKey`]).
pub fn can_share(a: &GenerateRequest, b: &GenerateRequest) -> bool {
    ScheduleKey::of(a) == ScheduleKey::of(b)
}

/// Runs every member and hands each one's pictures (or error) to `done` with the member's index, as soon as
/// that member is finished (a stopped member before the others). Members that cannot share the first
/// member's schedule run on their own afterwards.
pub fn text_to_image_cohort(
    model: &mut LoadedModel,
    members: Vec<CohortMember<'_>>,
    done: &mut dyn FnMut(usize, Result<Vec<RgbImage>, EngineError>),
) {
    let mut members: Vec<(usize, CohortMember<'_>)> = members.into_iter().enumerate().collect();
    if members.len() == 1 {
        if let Some((index, member)) = members.pop() {
            done(index, text_to_image(model, member.request, member.observer));
        }
        return;
    }
    let Some(first) = members.first().map(|(_, m)| m.request.clone()) else { return };
    let (shared, alone): (Vec<_>, Vec<_>) = members.into_iter().partition(|(_, m)| can_share(&first, m.request));
    run_shared(model, shared, done);
    for (index, member) in alone {
        done(index, text_to_image(model, member.request, member.observer));
    }
}

/// A member between calls: its latents and everything its own run would hold.
struct Running<'a> {
    index: usize,
    observer: &'a mut dyn StepObserver,
    latents: ArrayD<f32>,
    scheduler: Box<dyn Scheduler>,
    noise: BatchNoise,
    conditioning: UnetConditioning,
    guidance: Guidance,
    size: (u32, u32),
}

impl Running<'_> {
    /// Images in this member.
    fn images(&self) -> usize {
        self.latents.shape()[0]
    }
}

/// Prepares one member as [`text_to_image`] would.
fn prepare_member<'a>(
    model: &mut LoadedModel,
    index: usize,
    member: CohortMember<'a>,
) -> Result<Running<'a>, EngineError> {
    let request = member.request;
    let negative = RunExtras::default().negative_prompt(request);
    let Prepared { latents, scheduler, noise, conditioning, guidance } = prepare(model, request, negative)?;
    let size = (request.width, request.height);
    Ok(Running { index, observer: member.observer, latents, scheduler, noise, conditioning, guidance, size })
}

/// The denoising loop of [`super::denoise`] for members that share a schedule, then one decode per member.
fn run_shared(
    model: &mut LoadedModel,
    members: Vec<(usize, CohortMember<'_>)>,
    done: &mut dyn FnMut(usize, Result<Vec<RgbImage>, EngineError>),
) {
    let mut running = Vec::with_capacity(members.len());
    for (index, member) in members {
        match prepare_member(model, index, member) {
            Ok(run) => running.push(run),
            Err(error) => done(index, Err(error)),
        }
    }
    let Some(timesteps) = running.first().map(|r| r.scheduler.timesteps().to_vec()) else { return };
    let calls = timesteps.len();
    let mut stacked: Option<UnetConditioning> = None;
    let mut bound: Option<BoundInputs> = None;

    for (call, &t) in timesteps.iter().enumerate() {
        let before = running.len();
        running.retain_mut(|run| {
            let stop = run.observer.should_stop();
            if stop {
                done(run.index, Err(EngineError::Cancelled));
            }
            !stop
        });
        if running.is_empty() {
            return;
        }
        // The stacked conditioning, and its binding to the denoiser, are kept from call to call while the
        // members stay the same.
        let kept = stacked.take().filter(|_| running.len() == before);
        let conditioning = match kept {
            Some(conditioning) => Ok(conditioning),
            None => {
                bound = None;
                stack_conditioning(&running.iter().map(|r| &r.conditioning).collect::<Vec<_>>())
            }
        };
        let result = conditioning.and_then(|conditioning| {
            let predicted = shared_call(model, &running, &conditioning, &mut bound, call, t, calls);
            stacked = Some(conditioning);
            predicted
        });
        let predicted = match result {
            Ok(predicted) => predicted,
            Err(error) => {
                for run in running {
                    let stopped = run.observer.should_stop();
                    done(run.index, Err(if stopped { EngineError::Cancelled } else { error.clone() }));
                }
                return;
            }
        };
        let mut offset = 0;
        for run in running.iter_mut() {
            let rows = run.guidance.copies() * run.images();
            let own = predicted.slice_axis(Axis(0), (offset..offset + rows).into()).to_owned();
            offset += rows;
            let prediction = run.guidance.combine(own, run.images());
            let out = run.scheduler.step(StepInput::new(call, prediction.view(), run.latents.view()), &mut run.noise);
            run.latents = out.prev_sample;
            let step = call + 1;
            let preview = run.observer.preview_wanted(step, calls).and_then(|mode| {
                let estimate = out.pred_original_sample.as_ref().unwrap_or(&run.latents);
                render_preview(model, estimate, mode, run.size.0, run.size.1)
            });
            run.observer.on_step(step, calls, preview);
        }
    }
    for run in running {
        done(run.index, decode(model, run.latents, ShiftOnDecode::Add));
    }
}

/// One denoiser call for every member: each member's latents copied per guidance branch and scaled by its
/// own scheduler, side by side; the output has the same row layout.
fn shared_call(
    model: &mut LoadedModel,
    running: &[Running<'_>],
    conditioning: &UnetConditioning,
    bound: &mut Option<BoundInputs>,
    call: usize,
    t: f64,
    calls: usize,
) -> Result<ArrayD<f32>, EngineError> {
    let shape_err = |e: ndarray::ShapeError| EngineError::InvalidRequest(e.to_string());
    let mut blocks = Vec::with_capacity(running.len());
    for run in running {
        let copies = vec![run.latents.view(); run.guidance.copies()];
        let input = concatenate(Axis(0), &copies).map_err(shape_err)?;
        blocks.push(run.scheduler.scale_model_input(input.view(), call));
    }
    let views: Vec<_> = blocks.iter().map(|b| b.view()).collect();
    let sample = concatenate(Axis(0), &views).map_err(shape_err)?;
    let rows = sample.shape()[0];
    let predicted = predict(model, sample, t, conditioning, bound, call + 1 == calls)?;
    if predicted.shape()[0] != rows {
        return Err(EngineError::Inference {
            graph: model.denoiser.name(),
            message: format!("output has {} rows, expected {rows}", predicted.shape()[0]),
        });
    }
    Ok(predicted)
}

/// The members' conditioning side by side, in the order of their latents; position tables (Flux's ids) are
/// not batched and are the same for members of one picture size. Members of one model have the same inputs;
/// anything else is an error, never a silently shorter batch.
fn stack_conditioning(parts: &[&UnetConditioning]) -> Result<UnetConditioning, EngineError> {
    let mismatch = || EngineError::InvalidRequest("cohort members have conditioning of different shapes".into());
    let first = parts.first().ok_or_else(mismatch)?;
    let join = |pick: fn(&UnetConditioning) -> Option<&ArrayD<f32>>| -> Result<Option<ArrayD<f32>>, EngineError> {
        let views: Vec<_> = parts.iter().filter_map(|p| pick(p).map(|a| a.view())).collect();
        match views.len() {
            0 => Ok(None),
            n if n == parts.len() => concatenate(Axis(0), &views).map(Some).map_err(|_| mismatch()),
            _ => Err(mismatch()),
        }
    };
    Ok(UnetConditioning {
        encoder_hidden_states: join(|c| Some(&c.encoder_hidden_states))?.ok_or_else(mismatch)?,
        text_embeds: join(|c| c.text_embeds.as_ref())?,
        time_ids: join(|c| c.time_ids.as_ref())?,
        timestep_cond: join(|c| c.timestep_cond.as_ref())?,
        pooled_projections: join(|c| c.pooled_projections.as_ref())?,
        guidance: join(|c| c.guidance.as_ref())?,
        img_ids: first.img_ids.clone(),
        txt_ids: first.txt_ids.clone(),
    })
}
