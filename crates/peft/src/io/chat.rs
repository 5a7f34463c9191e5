//! Chat templates: the Jinja templates models ship (tokenizer_config.json's `chat_template`, or
//! GGUF's `tokenizer.chat_template`), rendered with `minijinja` in the environment transformers
//! renders them in (`trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, Python
//! string methods such as `.strip()`).

use minijinja::{context, Environment, ErrorKind};
use serde::Serialize;

use crate::{Error, Result};

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

/// Renders `template` over `messages` (`(role, content)`).
pub fn render(
    template: &str,
    messages: &[(String, String)],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    let bad = |e: minijinja::Error| Error::Tokenizer(format!("chat template: {e:#}"));
    env.add_template("chat", template).map_err(bad)?;
    let messages: Vec<Message> = messages
        .iter()
        .map(|(role, content)| Message { role, content })
        .collect();
    env.get_template("chat")
        .map_err(bad)?
        .render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token.unwrap_or(""),
            eos_token => eos_token.unwrap_or(""),
        })
        .map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_jinja_with_trimmed_blocks() {
        let t = "{% for m in messages %}\n<{{ m.role }}>{{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
        let msgs = vec![("user".to_string(), "  hi ".to_string())];
        assert_eq!(
            render(t, &msgs, true, None, None).unwrap(),
            "<user>hi\n<assistant>"
        );
        let e = render("{{ raise_exception('no') }}", &msgs, false, None, None).unwrap_err();
        assert!(e.to_string().contains("no"), "{e}");
    }
}
