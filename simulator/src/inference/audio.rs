//! `audio/transcriptions`, `audio/translations` (multipart uploads) and `audio/speech`
//! (binary audio out).

use axum::Json;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::request::{DeploymentInPath, Form, JsonBody};
use crate::state::SimulatorState;

/// `POST …/audio/transcriptions`.
pub(crate) async fn transcribe(
    State(_state): State<SimulatorState>,
    deployment: DeploymentInPath,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    speech_to_text(
        "transcribe",
        "Simulated transcription",
        deployment,
        multipart,
    )
    .await
}

/// `POST …/audio/translations`.
pub(crate) async fn translate(
    State(_state): State<SimulatorState>,
    deployment: DeploymentInPath,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    speech_to_text("translate", "Simulated translation", deployment, multipart).await
}

async fn speech_to_text(
    task: &str,
    lead: &str,
    deployment: DeploymentInPath,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let form = Form::read(multipart).await?;
    deployment.model(form.field("model"))?;
    let file = form.require_file()?;
    let text = format!("{lead} of {} ({} bytes).", file.filename, file.bytes.len());
    let format = form.field("response_format").unwrap_or("json");
    Ok(match format {
        "json" => Json(json!({"text": text})).into_response(),
        "verbose_json" => Json(json!({
            "task": task,
            "language": form.field("language").unwrap_or("english"),
            "duration": 1.0,
            "text": text,
            "segments": [{
                "id": 0, "seek": 0, "start": 0.0, "end": 1.0, "text": text, "tokens": [],
                "temperature": 0.0, "avg_logprob": 0.0, "compression_ratio": 1.0,
                "no_speech_prob": 0.0,
            }],
        }))
        .into_response(),
        "text" => text_response(format!("{text}\n")),
        "srt" => text_response(format!("1\n00:00:00,000 --> 00:00:01,000\n{text}\n\n")),
        "vtt" => text_response(format!(
            "WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n{text}\n\n"
        )),
        other => {
            return Err(ApiError::invalid_field(
                "response_format",
                format!("'{other}' is not one of json, text, srt, verbose_json, vtt."),
            ));
        }
    })
}

fn text_response(text: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

/// Sample rate of simulated speech: low, so a quarter second stays a few KB.
const SAMPLE_RATE: u32 = 8_000;
/// Samples of simulated speech (a quarter second).
const SPEECH_SAMPLES: u32 = SAMPLE_RATE / 4;
/// MPEG-1 Layer III frames of simulated speech (each 26 ms at 44.1 kHz).
const MP3_FRAMES: usize = 10;

/// `POST …/audio/speech`: silence, as MP3 (default), WAV or raw PCM.
pub(crate) async fn speak(
    State(_state): State<SimulatorState>,
    deployment: DeploymentInPath,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    deployment.model(body.get("model").and_then(Value::as_str))?;
    body.get("input")
        .and_then(Value::as_str)
        .filter(|i| !i.is_empty())
        .ok_or_else(|| ApiError::invalid_field("input", "'input' is required."))?;
    let (content_type, audio) = match body.get("response_format").and_then(Value::as_str) {
        None | Some("mp3") => ("audio/mpeg", silent_mp3()),
        Some("wav") => ("audio/wav", silent_wav()),
        Some("pcm") => ("audio/pcm", silent_pcm()),
        Some(other) => {
            return Err(ApiError::invalid_field(
                "response_format",
                format!("The simulator produces mp3, wav and pcm, not '{other}'."),
            ));
        }
    };
    Ok(([(header::CONTENT_TYPE, content_type)], audio).into_response())
}

/// 16-bit mono silence.
fn silent_pcm() -> Vec<u8> {
    vec![0; SPEECH_SAMPLES as usize * 2]
}

/// A RIFF/WAVE file of 16-bit mono silence.
fn silent_wav() -> Vec<u8> {
    let data = silent_pcm();
    let data_len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let mut wav = Vec::with_capacity(44 + data.len());
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + data_len).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16_u32.to_le_bytes()); // fmt chunk size
    wav.extend_from_slice(&1_u16.to_le_bytes()); // PCM
    wav.extend_from_slice(&1_u16.to_le_bytes()); // mono
    wav.extend_from_slice(&SAMPLE_RATE.to_le_bytes());
    wav.extend_from_slice(&(SAMPLE_RATE * 2).to_le_bytes()); // byte rate
    wav.extend_from_slice(&2_u16.to_le_bytes()); // block align
    wav.extend_from_slice(&16_u16.to_le_bytes()); // bits per sample
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&data_len.to_le_bytes());
    wav.extend_from_slice(&data);
    wav
}

/// MPEG-1 Layer III frames (128 kbit/s, 44.1 kHz, mono, no CRC) whose side information and
/// main data are all zero, which decodes as silence.
fn silent_mp3() -> Vec<u8> {
    // 144 * 128000 / 44100 = 417 bytes per frame (no padding).
    const FRAME_LEN: usize = 417;
    const HEADER: [u8; 4] = [0xff, 0xfb, 0x90, 0xc4];
    let mut frame = vec![0_u8; FRAME_LEN];
    frame[..4].copy_from_slice(&HEADER);
    frame.repeat(MP3_FRAMES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wav_header_matches_its_data() {
        let wav = silent_wav();
        assert_eq!(&wav[..4], b"RIFF");
        assert_eq!(&wav[8..12], b"WAVE");
        let riff_len = u32::from_le_bytes([wav[4], wav[5], wav[6], wav[7]]) as usize;
        assert_eq!(riff_len + 8, wav.len());
        assert!(wav.len() > 2_000);
    }

    #[test]
    fn mp3_is_a_few_kilobytes_of_frames() {
        let mp3 = silent_mp3();
        assert_eq!(mp3.len(), 417 * MP3_FRAMES);
        assert_eq!(&mp3[417..419], &[0xff, 0xfb]);
    }
}
