// Renders Ollama Modelfile TEMPLATEs with Go's text/template, as Ollama executes them: the
// template gets a value whose .Messages holds {Role, Content} messages (Ollama's api.Message
// fields) and "missingkey=zero". Reads {"templates": {name: text}, "conversations": {name:
// [{"role","content"}]}} on stdin, writes {name: {conversation: rendered}} on stdout.
//
// Used once to record tests/data/ollama_go_rendered.json (see tests/ollama_template.rs):
//
//	cargo test --release --test ollama_template -- --ignored   # needs `go` (1.19+) on PATH
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type Values struct {
	Messages []Message
}

type input struct {
	Templates     map[string]string `json:"templates"`
	Conversations map[string][]struct {
		Role    string `json:"role"`
		Content string `json:"content"`
	} `json:"conversations"`
}

func main() {
	var in input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	out := map[string]map[string]string{}
	for name, text := range in.Templates {
		t, err := template.New(name).Option("missingkey=zero").Parse(text)
		if err != nil {
			panic(name + ": " + err.Error())
		}
		out[name] = map[string]string{}
		for conv, msgs := range in.Conversations {
			var v Values
			for _, m := range msgs {
				v.Messages = append(v.Messages, Message{Role: m.Role, Content: m.Content})
			}
			var b strings.Builder
			if err := t.Execute(&b, v); err != nil {
				panic(name + "/" + conv + ": " + err.Error())
			}
			out[name][conv] = b.String()
		}
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", " ")
	if err := enc.Encode(out); err != nil {
		panic(err)
	}
}
