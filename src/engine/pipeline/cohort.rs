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
use ndarray::{concatenate, ArrayD, Axis, IxDyn};

use super::conditioning::{assemble, branches, classifier_guidance, SizeConditioning, UnetConditioning};
use super::denoise::{predict, Guidance};
use super::noise::BatchNoise;
use super::prompt::encode_prompts;
use super::text_to_image::{build_scheduler, latent_shape, starting_noise, text_to_image};
use super::vae::{decode, render_preview, ShiftOnDecode};
use super::{GenerateRequest, StepObserver};
use crate::engine::error::EngineError;
use crate::engine::model::{Capability, LoadedModel};
use crate::engine::scheduler::{Scheduler, StepInput};

/// One job of a cohort: its request and where its progress goes.
pub struct CohortMember<'a> {
    /// The job's validated request.
    pub request: &'a GenerateRequest,
    /// Its progress, previews and stop flag.
    pub observer: &'a mut dyn StepObserver,
}

/// Whether two requests walk the same schedule and may share denoiser calls: same picture size, scheduler,
/// step count and number of guidance branches (guidance on or off). Guidance scales, prompts, seeds and image
/// counts may differ.
pub fn can_share(a: &GenerateRequest, b: &GenerateRequest) -> bool {
    (a.width, a.height, a.steps, a.scheduler) == (b.width, b.height, b.steps, b.scheduler)
        && (a.guidance_scale > 1.0) == (b.guidance_scale > 1.0)
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
fn prepare<'a>(
    model: &mut LoadedModel,
    index: usize,
    member: CohortMember<'a>,
) -> Result<Running<'a>, (usize, CohortMember<'a>, EngineError)> {
    let request = member.request;
    let setup = (|| {
        model.info.require(Capability::TextToImage)?;
        let shape = latent_shape(&model.info, request)?;
        let mut noise = BatchNoise::new(&request.seeds());
        let initial = starting_noise(request, &shape, &mut noise)?;
        let guidance = classifier_guidance(model, request.guidance_scale, request.guidance_rescale);
        let negative = (!request.negative_prompt.is_empty()).then_some(request.negative_prompt.as_str());
        let prompts = encode_prompts(model, &request.prompt, negative, guidance != Guidance::Off)?;
        let size = SizeConditioning::for_picture(request.width, request.height);
        let conditioning = assemble(model, &prompts, branches(guidance), shape[0], &size, request.guidance_scale)?;
        let scheduler = build_scheduler(&model.info, request)?;
        let latents = initial * scheduler.init_noise_sigma() as f32;
        Ok::<_, EngineError>((latents, scheduler, noise, conditioning, guidance))
    })();
    match setup {
        Ok((latents, scheduler, noise, conditioning, guidance)) => Ok(Running {
            index,
            observer: member.observer,
            latents,
            scheduler,
            noise,
            conditioning,
            guidance,
            size: (request.width, request.height),
        }),
        Err(error) => Err((index, member, error)),
    }
}

/// The denoising loop of [`super::denoise`] for members that share a schedule, then one decode per member.
fn run_shared(
    model: &mut LoadedModel,
    members: Vec<(usize, CohortMember<'_>)>,
    done: &mut dyn FnMut(usize, Result<Vec<RgbImage>, EngineError>),
) {
    let mut running = Vec::with_capacity(members.len());
    for (index, member) in members {
        match prepare(model, index, member) {
            Ok(run) => running.push(run),
            Err((index, _, error)) => done(index, Err(error)),
        }
    }
    let Some(timesteps) = running.first().map(|r| r.scheduler.timesteps().to_vec()) else { return };
    let calls = timesteps.len();
    let timestep_rank = model.denoiser.input("timestep").map(|s| s.rank());
    let mut stacked: Option<UnetConditioning> = None;

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
        if running.len() != before || stacked.is_none() {
            stacked = Some(stack_conditioning(running.iter().map(|r| &r.conditioning).collect()));
        }
        let Some(conditioning) = stacked.as_ref() else { return };
        let result = shared_call(model, &running, conditioning, call, t, calls, timestep_rank);
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
    call: usize,
    t: f64,
    calls: usize,
    timestep_rank: Option<usize>,
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
    let value = model.denoiser_kind.timestep_value(t);
    let timestep = match timestep_rank {
        Some(0) => ArrayD::from_elem(IxDyn(&[]), value),
        _ => ArrayD::from_elem(IxDyn(&[rows]), value),
    };
    let predicted = predict(model, sample, timestep, conditioning, call + 1 == calls)?;
    if predicted.shape()[0] != rows {
        return Err(EngineError::Inference {
            graph: model.denoiser.name(),
            message: format!("output has {} rows, expected {rows}", predicted.shape()[0]),
        });
    }
    Ok(predicted)
}

/// The members' conditioning side by side, in the order of their latents; position tables (Flux's ids) are
/// not batched and are the same for members of one picture size.
fn stack_conditioning(parts: Vec<&UnetConditioning>) -> UnetConditioning {
    let Some(first) = parts.first() else {
        return UnetConditioning {
            encoder_hidden_states: ArrayD::zeros(IxDyn(&[0])),
            text_embeds: None,
            time_ids: None,
            timestep_cond: None,
            pooled_projections: None,
            guidance: None,
            img_ids: None,
            txt_ids: None,
        };
    };
    let all = |pick: fn(&UnetConditioning) -> Option<&ArrayD<f32>>| -> Option<ArrayD<f32>> {
        let views: Option<Vec<_>> = parts.iter().map(|p| pick(p).map(|a| a.view())).collect();
        concatenate(Axis(0), &views?).ok()
    };
    UnetConditioning {
        encoder_hidden_states: all(|c| Some(&c.encoder_hidden_states))
            .unwrap_or_else(|| first.encoder_hidden_states.clone()),
        text_embeds: all(|c| c.text_embeds.as_ref()),
        time_ids: all(|c| c.time_ids.as_ref()),
        timestep_cond: all(|c| c.timestep_cond.as_ref()),
        pooled_projections: all(|c| c.pooled_projections.as_ref()),
        guidance: all(|c| c.guidance.as_ref()),
        img_ids: first.img_ids.clone(),
        txt_ids: first.txt_ids.clone(),
    }
}
